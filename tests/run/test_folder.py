"""The run folder's names and its results record: written in one place, read in one place, an old or damaged
file refused in one line that names it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_kvasir.errors import DataError
from ssl_kvasir.run.folder import (
    RESULTS_FORMAT,
    RunFolder,
    read_results,
    read_run_record,
    read_tracking_id,
    write_results,
    write_run_record,
)


def record(**changes) -> dict:
    """A complete results record of two classes."""
    base = {
        "method": "fixmatch",
        "backbone": "resnet18",
        "fold": 1,
        "seed": 0,
        "data_seed": 0,
        "label_budget": {"kind": "fraction", "amount": 0.1, "id": "frac0.1"},
        "n_labeled": 12,
        "classes": ["polyp", "cecum"],
        "metrics": {"mcc": 0.5, "macro_f1": 0.25},
        "confusion_matrix": [[3, 1], [0, 4]],
        "checkpoint": "checkpoints/best.ckpt",
    }
    return {**base, **changes}


def test_the_folder_names_every_file(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    assert folder.results == tmp_path / "run" / "results.json"
    assert folder.run_record.name == "run.json" and folder.progress.name == "progress.json"
    assert folder.last == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert folder.best == tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert folder.lock.name == ".lock" and folder.evaluation.name == "evaluation.json"
    stage = folder.stage("round_0")
    assert stage.stage_results == tmp_path / "run" / "round_0" / "stage_results.json"
    assert folder.relative(folder.best) == "checkpoints/best.ckpt"
    assert folder.resolve("checkpoints/best.ckpt") == folder.best


def test_a_record_reads_back_as_written_extra_fields_kept(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_results(path, record(selection={"rule": "later"}))
    on_disk = json.loads(path.read_text())
    assert next(iter(on_disk)) == "format" and on_disk["format"] == RESULTS_FORMAT
    assert read_results(path) == {"format": RESULTS_FORMAT, **record(selection={"rule": "later"})}


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{}", "unversioned results file"),
        (json.dumps({**record(), "format": "ssl_kvasir.results/0"}), "'ssl_kvasir.results/0'"),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
        (json.dumps({"format": RESULTS_FORMAT, **record(fold=-1)}), "'fold'"),
        (
            json.dumps({"format": RESULTS_FORMAT, **record(label_budget={"kind": "fraction", "amount": 2})}),
            "label_budget",
        ),
        (json.dumps({"format": RESULTS_FORMAT, **record(classes=["a", "a"])}), "names a class twice"),
        (json.dumps({"format": RESULTS_FORMAT, **record(metrics={"mcc": "high"})}), "metrics.mcc"),
        (json.dumps({"format": RESULTS_FORMAT, **record(confusion_matrix=[[1]])}), "2x2"),
        (
            json.dumps({"format": RESULTS_FORMAT, **{k: v for k, v in record().items() if k != "n_labeled"}}),
            "'n_labeled'",
        ),
    ],
)
def test_a_bad_record_is_one_line_naming_the_file(tmp_path: Path, content: str, named: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(DataError) as raised:
        read_results(path)
    message = str(raised.value)
    assert str(path) in message and named in message and "\n" not in message


def test_the_run_record_is_versioned(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    write_run_record(folder, {"data.fold": 1})
    assert read_run_record(folder) == {"data.fold": 1}
    folder.run_record.write_text(json.dumps({"fingerprint": {"data.fold": 1}}))
    with pytest.raises(DataError, match="unversioned run record"):
        read_run_record(folder)


def test_the_run_record_carries_a_tracking_id_of_its_own(tmp_path: Path) -> None:
    """Drawn once per run: two runs of the same settings get two ids; a run.json without one (older) has
    none, and a folder without run.json has none yet."""
    a, b = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    assert read_tracking_id(a) is None
    for folder in (a, b):
        folder.root.mkdir()
        write_run_record(folder, {"data.fold": 1})
    first = read_tracking_id(a)
    assert first is not None and len(first) == 16 and int(first, 16) >= 0
    assert read_tracking_id(a) == first != read_tracking_id(b)
    a.run_record.write_text(json.dumps({"format": "ssl_kvasir.run/1", "fingerprint": {"data.fold": 1}}))
    assert read_tracking_id(a) is None and read_run_record(a) == {"data.fold": 1}


def test_the_folder_module_imports_no_torch() -> None:
    code = "import sys, ssl_kvasir.run.folder; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
