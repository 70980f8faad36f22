"""Every bad input is one line: a table of bad values, files and folders walked through the real command line.

For each case: the exit status (2: bad input or config), exactly one ``ssl-kvasir <command>: error:`` line
naming the key or file, and no traceback anywhere in the output. Config values are refused before torch is
imported, so in about a second.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny

from ssl_kvasir import cli
from ssl_kvasir.config import CHECKPOINT_RULES, compose, method_names, validate
from ssl_kvasir.errors import ConfigError

ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_kvasir.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=cwd,
    )


def assert_one_line(proc: subprocess.CompletedProcess, command: str, status: int, *named: str) -> str:
    """The exit status, one error line naming everything in ``named``, no traceback; returns the line."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == status, output
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"ssl-kvasir {command}:")]
    assert len(lines) == 1, output
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(synth_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the table points at: a split file with a '..' row, a damaged checkpoint, a run folder holding a
    damaged last.ckpt, a regular file where a folder should be."""
    tmp = tmp_path_factory.mktemp("bad")
    split = tmp / "dotdot_split.csv"
    lines = (synth_archive / "2_fold_split.csv").read_text().splitlines()
    lines[3] = "../escape.jpg;polyp;0"
    split.write_text("\n".join(lines) + "\n")
    damaged = tmp / "damaged.ckpt"
    damaged.write_bytes(b"PK\x03\x04 this is not a whole zip archive")
    run = tmp / "run_with_damaged_last"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(damaged, run / "checkpoints" / "last.ckpt")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    # A weights file holding a Python object besides tensors (as a pickle payload does): never unpickled.
    import torch

    payload = tmp / "payload.pth"
    torch.save({"conv1.weight": datetime.date(2020, 1, 1)}, payload)
    return {
        "split": split,
        "damaged": damaged,
        "run": run,
        "file": a_file,
        "payload": payload,
    }


@pytest.fixture(scope="module")
def trained(synth_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the table's checkpoint rows apply or resume (issue 19):

    - ``ckpt``: a tiny fit's selected checkpoint, trained with fold 1 held out, at 32 px, every label;
    - ``killed``: a copy of that run's folder as if killed after its last checkpoint (no results.json), whose
      split file ``run_split`` was edited since (its rows reordered: the same images and folds);
    - ``swapped_split``: the archive's split file with its two folds swapped;
    - ``three_ckpt``: a checkpoint trained on a folder archive of classes cecum, ileum, polyps, and
      ``other_classes``: an archive of the same counts whose classes are aaa, bbb, ccc;
    - ``empty_results``: a run folder whose results.json holds ``{}``.
    """
    from PIL import Image

    tmp = tmp_path_factory.mktemp("trained")
    run_split = tmp / "split.csv"
    shutil.copy(synth_archive / "2_fold_split.csv", run_split)
    run = tmp / "run"
    fit = [f"data.root={synth_archive}", f"data.split_file={run_split}", "data.fold=1"]
    done = run_cli("fit", f"output_dir={run}", *fit, *TINY_RUN)
    assert done.returncode == 0, done.stderr
    killed = tmp / "killed"
    shutil.copytree(run, killed)
    (killed / "results.json").unlink()
    header, *rows = run_split.read_text().splitlines()
    run_split.write_text("\n".join([header, *reversed(rows)]) + "\n")
    swapped = tmp / "swapped.csv"
    flip = {"0": "1", "1": "0"}
    swapped.write_text(
        "\n".join([header, *(f"{r.rsplit(';', 1)[0]};{flip[r.rsplit(';', 1)[1]]}" for r in rows)]) + "\n"
    )
    for names, root in (
        (("cecum", "ileum", "polyps"), tmp / "three"),
        (("aaa", "bbb", "ccc"), tmp / "other"),
    ):
        for c, name in enumerate(names):
            (root / name).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (16, 16), (40 * i, 80 * c, 0)).save(root / name / f"{i}.jpg")
    three = tmp / "three_run"
    folder = ["data=folder", f"data.root={tmp / 'three'}", "data.generate_folds=2", "data.val_fraction=0.5"]
    done = run_cli("fit", f"output_dir={three}", *folder, *TINY_RUN)
    assert done.returncode == 0, done.stderr
    empty = tmp / "empty_results"
    empty.mkdir()
    (empty / "results.json").write_text("{}")
    return {
        "ckpt": run / "checkpoints" / "best.ckpt",
        "killed": killed,
        "run_split": run_split,
        "swapped_split": swapped,
        "three_ckpt": three / "checkpoints" / "best.ckpt",
        "other_classes": tmp / "other",
        "empty_results": empty,
    }


# (command, arguments, exit status, what the one line must name); {root}, {split}, {out} and the keys of the
# bad_inputs and trained fixtures are filled in per test.
FIT = ["data.root={root}", "data.split_file={split}", "output_dir={out}", "logger=csv"]
TINY_RUN = tiny("trainer.max_steps=2")  # the trained fixture's fit
APPLY = [
    "checkpoint={ckpt}",
    "data.root={root}",
    "data.split_file={split}",
    "output_dir={out}",
    "data.num_workers=0",
]
CASES = [
    ("fit", [*FIT, "data.batch_size=0"], 2, ["data.batch_size", "0"]),
    ("fit", [*FIT, "data.image_size=0"], 2, ["data.image_size"]),
    ("fit", [*FIT, "data.label_fraction=abc"], 2, ["data.label_fraction", "abc"]),
    ("fit", [*FIT, "data.label_fraction=1.5"], 2, ["data.label_fraction", "(0, 1]"]),
    ("fit", [*FIT, "data.labels_per_class=5"], 2, ["data.label_fraction", "data.labels_per_class"]),
    ("fit", [*FIT, "data.val_fraction=1"], 2, ["data.val_fraction"]),
    ("fit", [*FIT, "data.num_workers=-1"], 2, ["data.num_workers"]),
    ("fit", [*FIT, "data.sampler=balanced"], 2, ["data.sampler", "class_balanced"]),
    ("fit", [*FIT, "trainer.max_steps=0"], 2, ["trainer.max_steps"]),
    ("fit", [*FIT, "trainer.precision=17"], 2, ["trainer.precision", "bf16-mixed"]),
    ("fit", [*FIT, "trainer.devices=0"], 2, ["trainer.devices"]),
    ("fit", [*FIT, "method=fixmatch", "method.threshold=1.5"], 2, ["method.threshold"]),
    ("fit", [*FIT, "method=fixmatch", "method.masking=adaptive"], 2, ["method.masking", "flexmatch"]),
    ("fit", [*FIT, "method.lr=0"], 2, ["method.lr"]),
    ("fit", [*FIT, "method.name=nope"], 2, ["method.name", "fixmatch"]),
    ("fit", [*FIT, "method=nope"], 2, ["method", "nope"]),
    ("fit", [*FIT, "data.no_such_key=1"], 2, ["no_such_key"]),
    ("fit", [*FIT, "backbone.drop_rate=1"], 2, ["backbone.drop_rate"]),
    ("fit", ["output_dir={out}"], 2, ["data.root"]),
    ("fit", ["data.root={tmp}/nowhere", "data.split_file={split}", "output_dir={out}"], 2, ["nowhere"]),
    (
        "fit",
        ["data.root={root}", "data.split_file={bad_split}", "output_dir={out}"],
        2,
        ["dotdot_split.csv", "'..'"],
    ),
    (
        "fit",
        ["data.root={root}", "data.split_file={split}", "output_dir={run}"],
        2,
        ["last.ckpt", "delete it"],
    ),
    ("fit", ["data.root={root}", "data.split_file={split}", "output_dir={file}/run"], 2, ["a_file"]),
    ("evaluate", [*FIT, "checkpoint={damaged}"], 2, ["damaged.ckpt"]),
    (
        "embed",
        ["checkpoint={damaged}", "data.root={root}", "data.split_file={split}", "embed.batch_size=0"],
        2,
        ["embed.batch_size"],
    ),
    (
        "embed",
        ["checkpoint={damaged}", "data.root={root}", "data.split_file={split}", "output_dir={out}"],
        2,
        ["damaged.ckpt"],
    ),
    ("check", ["--root", "{tmp}/nowhere"], 2, ["nowhere"]),
    ("prepare", ["--root", "{root}", "--cache", "{out}/cache", "--size", "0"], 2, ["size"]),
    # Issue 19: a key added with '+' is refused like a misspelt one (it used to run with the key ignored), and
    # neither message advises '+'.
    ("fit", [*FIT, "+data.bacth_size=8"], 2, ["data.bacth_size", "did you mean data.batch_size?"]),
    (
        "fit",
        [*FIT, "data.bacth_size=8"],
        2,
        ["data.bacth_size is not a key", "did you mean data.batch_size?"],
    ),
    ("fit", [*FIT, "++method.lr_typo=1"], 2, ["method.lr_typo"]),
    # predictions must be a list: `predictions=5` was a traceback and `predictions=file.csv` was read one
    # character at a time, each after 34 s of embedding; now one line before any model is loaded.
    ("analyze", ["checkpoint={damaged}", "data.root={root}", "output_dir={out}", "predictions=5"], 2, ["5"]),
    (
        "analyze",
        ["checkpoint={damaged}", "data.root={root}", "output_dir={out}", "predictions=file.csv"],
        2,
        ["predictions must be a list of paths in brackets", "'file.csv'"],
    ),
    (
        "analyze",
        ["checkpoint={damaged}", "data.root={root}", "output_dir={out}", "predictions=[{tmp}/none.csv]"],
        2,
        ["predictions:", "none.csv is not a file"],
    ),
    ("analyze", ["data.root={root}", "output_dir={out}"], 2, ["missing value for checkpoint"]),
    (
        "export-pseudo-labels",
        ["checkpoint={damaged}", "data.root={root}"],
        2,
        ["missing value for output_dir"],
    ),
    # Misleading messages: a checkpoint that is a folder ("does not exist"), an output_dir that is a file (a
    # .lock error), an output that is a folder (a raw OSError), a pickle in backbone.weights (torch's advice
    # to load it with weights_only=False).
    ("evaluate", [*FIT, "checkpoint={tmp}"], 2, ["is a folder: name a checkpoint file"]),
    ("embed", ["checkpoint={tmp}", "data.root={root}", "output_dir={out}"], 2, ["is a folder"]),
    ("fit", ["data.root={root}", "data.split_file={split}", "output_dir={file}"], 2, ["a_file is a file"]),
    (
        "export-pseudo-labels",
        ["checkpoint={damaged}", "data.root={root}", "output={tmp}"],
        2,
        ["output=", "is a folder: name the file to write"],
    ),
    ("fit", [*FIT, "backbone.weights={payload}"], 2, ["payload.pth", "not only tensors"]),
    # Where the folds come from: checked with the config, before torch is imported (it was after).
    (
        "fit",
        [*FIT, "data.generate_folds=2"],
        2,
        ["either a split file (data.split_file) or data.generate_folds"],
    ),
    ("fit", ["data.root={root}", "output_dir={out}"], 2, ["no split file", "data.generate_folds=N"]),
    ("fit", ["data.root={root}", "data.split_file={tmp}/none.csv", "output_dir={out}"], 2, ["none.csv"]),
    # Issue 19: the checkpoint is the source of truth. A setting given that disagrees with it is refused, naming
    # both values (evaluate used to score the checkpoint's own training images, or at 224 px); so are data whose
    # split or classes are not the checkpoint's (folds swapped; other class names of the same count).
    *(
        (command, [*APPLY, setting], 2, named)
        for command in ("evaluate", "analyze")
        for setting, named in (
            ("data.fold=0", ["data.fold=0", "the checkpoint's is 1"]),
            ("data.image_size=64", ["data.image_size=64", "the checkpoint's is 32"]),
            ("data.label_fraction=0.5", ["label budget frac0.5", "the checkpoint's is frac1"]),
        )
    ),
    (
        "evaluate",
        ["checkpoint={ckpt}", "data.root={root}", "data.split_file={swapped_split}", "output_dir={out}"],
        2,
        ["best.ckpt was trained and evaluated on other images than the split"],
    ),
    *(
        (
            command,
            [
                "checkpoint={three_ckpt}",
                "data=folder",
                "data.root={other_classes}",
                "data.generate_folds=2",
                "output_dir={out}",
            ],
            2,
            ["was trained on 3 classes that the data at", "cecum / aaa"],
        )
        for command in ("evaluate", "analyze")
    ),
    # An edited input file between a kill and the resume: the same command is refused, naming the file.
    (
        "fit",
        ["data.root={root}", "data.split_file={run_split}", "data.fold=1", "output_dir={killed}", *TINY_RUN],
        2,
        ["data.split_file", "split.csv changed since the run started", "put the file back"],
    ),
    # A results.json holding {}: one line naming it (it was "the run is done", then a KeyError traceback).
    ("fit", [*FIT[:2], "output_dir={empty_results}", "logger=csv"], 2, ["results.json", "unversioned"]),
]


@pytest.mark.parametrize(
    ("command", "args", "status", "named"), CASES, ids=[f"{c[0]}-{c[1][-1]}" for c in CASES]
)
def test_bad_input_is_one_line(
    synth_archive, bad_inputs, trained, tmp_path, command, args, status, named
) -> None:
    fill = {
        "root": synth_archive,
        "split": synth_archive / "2_fold_split.csv",
        "out": tmp_path / "out",
        "tmp": tmp_path,
        "bad_split": bad_inputs["split"],
        "damaged": bad_inputs["damaged"],
        "run": bad_inputs["run"],
        "file": bad_inputs["file"],
        "payload": bad_inputs["payload"],
        **trained,
    }
    proc = run_cli(command, *[a.format(**fill) for a in args])
    assert_one_line(proc, command, status, *named)


def test_config_values_are_refused_before_torch_is_imported() -> None:
    code = (
        "import sys\n"
        "from ssl_kvasir.cli import main\n"
        "rc = main(['fit', 'data.root=/x', 'output_dir=/y', 'data.batch_size=0'])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "torch not imported"
    assert "data.batch_size must be >= 1, got 0" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "output_dir=/y"],  # a missing data.root
        ["fit", "data.root=/x", "output_dir=/y", "+data.bacth_size=8"],
        ["analyze", "checkpoint=/dev/null", "data.root=/x", "output_dir=/y", "predictions=5"],
        ["embed", "checkpoint=/", "data.root=/x", "output_dir=/y"],  # a checkpoint that is a folder
        ["export-pseudo-labels", "checkpoint=/dev/null", "data.root=/x"],  # no output_dir, no output
        ["fit", "data.root=/", "output_dir=/y"],  # neither a split file nor generated folds
        ["fit", "data.root=/", "output_dir=/y", "data.split_file=/s.csv", "data.generate_folds=2"],  # both
    ],
    ids=["missing-key", "plus-key", "predictions", "checkpoint-folder", "no-output", "no-folds", "two-folds"],
)
def test_input_checks_run_before_torch_is_imported(argv: list[str]) -> None:
    """The keys and paths a command names are checked right after its config, before torch is imported (two
    checks ran after it): a mistake costs a second."""
    code = (
        "import sys\n"
        "from ssl_kvasir.cli import main\n"
        f"rc = main({argv!r})\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "torch not imported", proc.stderr
    assert proc.stderr.startswith(f"ssl-kvasir {argv[0]}: error: "), proc.stderr


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("protocol", ["matched", "paper"])
def test_every_shipped_config_passes_validation(method: str, protocol: str) -> None:
    validate(compose("fit", [f"method={method}", f"protocol={protocol}", "data.root=/x", "output_dir=/y"]))
    validate(compose("analyze", ["checkpoint=c.ckpt", "data.root=/x"]), CHECKPOINT_RULES)


@pytest.mark.parametrize(
    "experiment",
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml")),
)
def test_every_experiment_config_passes_validation(experiment: str) -> None:
    validate(compose("fit", [f"experiment={experiment}", "data.root=/x", "output_dir=/y"]))


def test_validation_names_every_bad_key_on_one_line() -> None:
    cfg = compose(
        "fit",
        ["data.root=/x", "output_dir=/y", "data.batch_size=true", "data.mu=-1", "trainer.devices=[0,1]"],
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    message = str(e.value)
    assert "\n" not in message
    # A boolean is not a count; a list of device indices is a valid devices value.
    assert "data.batch_size must be an integer >= 1, got True" in message
    assert "data.mu must be >= 0, got -1" in message
    assert "trainer.devices" not in message


def test_os_errors_map_to_failed_or_bad_input(monkeypatch, capsys) -> None:
    """A full disk is a failure of the machine (1); an unwritable path is bad input (2); either is one line."""

    def full(argv):
        raise OSError(
            errno.ENOSPC, "cannot write checkpoint /r/checkpoints/last.ckpt: No space left on device"
        )

    def denied(argv):
        raise PermissionError(errno.EACCES, "cannot write /r/results.json: Permission denied")

    monkeypatch.setitem(cli.COMMANDS, "full", (full, ""))
    monkeypatch.setitem(cli.COMMANDS, "denied", (denied, ""))
    assert cli.main(["full"]) == 1
    assert cli.main(["denied"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "ssl-kvasir full: error: [Errno 28] cannot write checkpoint /r/checkpoints/last.ckpt: No space left on device",
        "ssl-kvasir denied: error: [Errno 13] cannot write /r/results.json: Permission denied",
    ]


def test_an_error_raised_in_a_dataloader_worker_is_its_own_line(monkeypatch, capsys) -> None:
    """torch re-raises a worker's exception with the worker's traceback in its message; the line is the cause."""
    from ssl_kvasir.errors import DataError

    def worker_failed(argv):
        raise DataError(
            "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "ssl_kvasir/data/decode.py", line 80, in decode_image\n'
            "ssl_kvasir.errors.DataError: labeled-images/x.jpg: cannot decode image: broken data stream"
        )

    monkeypatch.setitem(cli.COMMANDS, "worker", (worker_failed, ""))
    assert cli.main(["worker"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ssl-kvasir worker: error: labeled-images/x.jpg: cannot decode image: broken data stream"
    ]
