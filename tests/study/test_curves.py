"""`ssl-kvasir curves` on hand-made results files: numbers against a hand computation, malformed files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import results_record as record

from ssl_kvasir.cli import main
from ssl_kvasir.errors import DataError
from ssl_kvasir.names import LabelBudget
from ssl_kvasir.study.curves import find_results_files, load_runs, summarize, write_curves


def write_run(
    root: Path,
    method: str,
    fraction: float | None,
    fold: int,
    seed: int,
    mcc: float,
    macro_f1: float,
    micro_f1: float,
    per_class: int | None = None,
    backbone: str = "resnet18",
    name: str = "results.json",
) -> Path:
    budget = f"frac{fraction:g}" if per_class is None else f"lpc{per_class}"
    path = root / method / backbone / budget / f"fold{fold}" / f"seed{seed}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    results = record(
        method=method,
        backbone=backbone,
        fold=fold,
        seed=seed,
        data_seed=seed,
        label_budget=LabelBudget.from_settings(fraction, per_class).record(),
        metrics={"mcc": mcc, "macro_f1": macro_f1, "micro_f1": micro_f1, "accuracy": micro_f1},
    )
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """FixMatch at 10 %: 2 folds x 2 seeds; supervised at 10 % (one run) and 100 % (2 folds); a per-class
    budget; a self-training round file that must not count."""
    root = tmp_path / "runs"
    for (fold, seed), mcc in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [0.5, 0.6, 0.7, 0.8], strict=True):
        write_run(root, "fixmatch", 0.1, fold, seed, mcc=mcc, macro_f1=mcc / 2, micro_f1=0.9)
    write_run(root, "supervised", 0.1, 0, 0, mcc=0.40, macro_f1=0.20, micro_f1=0.50)
    write_run(root, "supervised", 1.0, 0, 0, mcc=0.80, macro_f1=0.55, micro_f1=0.85)
    write_run(root, "supervised", 1.0, 1, 0, mcc=0.90, macro_f1=0.60, micro_f1=0.95)
    write_run(root, "supervised", None, 0, 0, mcc=0.30, macro_f1=0.10, micro_f1=0.40, per_class=25)
    # A self-training round's file beside a fixmatch run: not a run of its own.
    write_run(root, "fixmatch", 0.1, 0, 0, mcc=-1.0, macro_f1=0.0, micro_f1=0.0, name="stage_results.json")
    return root


def test_summary_matches_a_hand_computation(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves"
    assert main(["curves", str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "label_efficiency.csv")
    assert len(table) == 4  # fixmatch@10%, supervised@10%, supervised@100%, supervised@25/class

    fix = table[(table.method == "fixmatch") & (table.label_fraction == 0.1)].iloc[0]
    # By hand: MCC 0.5, 0.6, 0.7, 0.8 -> mean 0.65; squared deviations 0.0225 + 0.0025 + 0.0025 + 0.0225 = 0.05,
    # sample variance 0.05 / 3, std 0.129099...
    assert fix.n == 4 and fix.folds == "0 1" and fix.seeds == "0 1"
    assert fix.mcc_mean == pytest.approx(0.65, abs=1e-6)
    assert fix.mcc_std == pytest.approx(math.sqrt(0.05 / 3), abs=1e-6)
    assert fix.macro_f1_mean == pytest.approx(0.325, abs=1e-6)
    assert fix.macro_f1_std == pytest.approx(math.sqrt(0.05 / 3) / 2, abs=1e-6)
    assert fix.micro_f1_mean == pytest.approx(0.9) and fix.micro_f1_std == pytest.approx(0.0)

    full = table[(table.method == "supervised") & (table.label_fraction == 1.0)].iloc[0]
    # 0.80 and 0.90: mean 0.85, std sqrt(2 * 0.05^2 / 1) = 0.070711
    assert (
        full.n == 2
        and full.mcc_mean == pytest.approx(0.85)
        and full.mcc_std == pytest.approx(0.0707107, abs=1e-6)
    )
    single = table[(table.method == "supervised") & (table.label_fraction == 0.1)].iloc[0]
    assert single.n == 1 and single.mcc_mean == pytest.approx(0.40) and pd.isna(single.mcc_std)
    per_class = table[table.labels_per_class.notna()].iloc[0]
    assert per_class.labels_per_class == 25 and pd.isna(per_class.label_fraction) and per_class.n == 1

    md = (out / "label_efficiency.md").read_text()
    assert "| fixmatch | resnet18 | 0.650 ± 0.129 (4) |" in md
    assert "| supervised | resnet18 | 0.400 (1) | 0.850 ± 0.071 (2) |" in md
    assert "## MCC by labeled images per class" in md and "25/class" in md
    assert "MCC 0.899, macro-F1 0.619, micro-F1 0.907" in md  # the paper's DenseNet-161 reference
    png = (out / "label_efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == [
        "label_efficiency.csv",
        "label_efficiency.md",
        "label_efficiency.png",
    ]


def test_every_method_that_ran_is_in_the_curves(tmp_path: Path) -> None:
    from ssl_kvasir.methods import METHODS

    root, out = tmp_path / "runs", tmp_path / "curves"
    for i, method in enumerate(sorted(METHODS)):
        write_run(root, method, 0.1, 0, 0, mcc=0.1 + i / 100, macro_f1=0.1, micro_f1=0.2)
    assert main(["curves", str(root), "--out", str(out)]) == 0
    assert sorted(pd.read_csv(out / "label_efficiency.csv").method) == sorted(METHODS)
    md = (out / "label_efficiency.md").read_text()
    assert all(f"| {method} | resnet18 |" in md for method in METHODS)


def test_other_metrics_and_round_files(sweep: Path, tmp_path: Path) -> None:
    report = write_curves([sweep], tmp_path / "out", metrics=["accuracy"])
    assert list(report.summary.columns[-2:]) == ["accuracy_mean", "accuracy_std"]
    assert len(report.runs) == 8
    assert not any(Path(p).name == "stage_results.json" for p in report.runs.path)
    assert report.wandb_logged is False


def test_summary_against_a_naive_loop(tmp_path: Path) -> None:
    """pandas' groupby against plain Python over a grid of methods, budgets, folds and seeds."""
    import random
    import statistics

    rng = random.Random(0)
    expected: dict[tuple, list[float]] = {}
    for method in ("supervised", "fixmatch"):
        for fraction in (0.01, 0.25, 1.0):
            for fold in range(2):
                for seed in range(rng.randint(1, 3)):
                    mcc = rng.random()
                    write_run(tmp_path, method, fraction, fold, seed, mcc=mcc, macro_f1=0.1, micro_f1=0.2)
                    expected.setdefault((method, fraction), []).append(mcc)
    summary = summarize(load_runs([tmp_path]))
    assert len(summary) == len(expected)
    for row in summary.itertuples():
        values = expected[(row.method, row.label_fraction)]
        assert row.n == len(values)
        assert row.mcc_mean == pytest.approx(statistics.fmean(values))
        if len(values) > 1:
            assert row.mcc_std == pytest.approx(statistics.stdev(values))
        else:
            assert math.isnan(row.mcc_std)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"method": "m"}', "unversioned results file"),
        (json.dumps({k: v for k, v in record().items() if k != "method"}), "missing field 'method'"),
        (json.dumps(record(metrics={"mcc": 0.1})), "'metrics' lacks 'macro_f1'"),
        (json.dumps(record(fold=-1)), "'fold' must be a non-negative integer"),
        (
            json.dumps(record(label_budget={"kind": "fraction", "amount": 1.5, "id": "frac1.5"})),
            "must be a share in (0, 1], got 1.5",
        ),
        (json.dumps(record(label_budget=None)), "'label_budget'"),
    ],
)
def test_malformed_file_exits_2_naming_it(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    bad = sweep / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    out = tmp_path / "curves"
    assert main(["curves", str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_nan_metric_and_missing_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_run(tmp_path / "runs", "fixmatch", 0.1, 0, 0, mcc=0.5, macro_f1=0.2, micro_f1=0.3)
    path.write_text(path.read_text().replace('"mcc": 0.5', '"mcc": NaN'))
    with pytest.raises(DataError, match=r"metrics.mcc must be a finite number"):
        load_runs([tmp_path / "runs"])
    assert main(["curves", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no results.json in"):
        find_results_files([tmp_path / "empty"])


def test_one_run_named_twice_counts_once_but_a_copy_is_refused(sweep: Path, tmp_path: Path) -> None:
    run_dir = sweep / "supervised" / "resnet18" / "frac1" / "fold0" / "seed0"
    assert len(load_runs([sweep, run_dir, run_dir / "results.json"])) == 8
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((run_dir / "results.json").read_bytes())
    with pytest.raises(DataError, match="are the same run"):
        load_runs([sweep, copy])


def test_wandb_offline_run_gets_the_table(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--wandb opens an offline run (no W&B configured) and logs the table and the plot into it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "curves"
    assert main(["curves", str(sweep), "--out", str(out), "--wandb", "--wandb-project", "test-curves"]) == 0
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    tables = list(run_dirs[0].rglob("label_efficiency/table_*.table.json"))
    images = list(run_dirs[0].rglob("label_efficiency/curves_*.png"))
    assert tables and images
    logged = json.loads(tables[0].read_text())
    assert len(logged["data"]) == 4 and "mcc_mean" in logged["columns"]
    # A native W&B line chart per metric (and budget kind): its data table, and the chart in the run's record.
    record = next(run_dirs[0].glob("run-*.wandb")).read_bytes()
    # Three metrics x two kinds of budget (the fixture has a labels-per-class point).
    assert record.count(b"wandb/lineseries/v0") == 6
    for metric in ("mcc", "macro_f1", "micro_f1"):
        for key in (metric, f"{metric}_per_class"):
            assert list(run_dirs[0].rglob(f"label_efficiency/{key}_table_*.table.json")), key
    chart = json.loads(next(run_dirs[0].rglob("label_efficiency/mcc_table_*.table.json")).read_text())
    assert chart["columns"] == ["step", "lineKey", "lineVal"]
    points = {(key, x): y for x, key, y in chart["data"]}
    # FixMatch at 10 %: mean 0.65 and std sqrt(0.05 / 3) over four runs (as in the hand computation above).
    assert points[("fixmatch (resnet18)", 10.0)] == pytest.approx(0.65)
    assert points[("fixmatch (resnet18) + std", 10.0)] == pytest.approx(0.65 + math.sqrt(0.05 / 3))
    assert points[("fixmatch (resnet18) - std", 10.0)] == pytest.approx(0.65 - math.sqrt(0.05 / 3))
    assert points[("supervised (resnet18)", 100.0)] == pytest.approx(0.85)
    assert ("supervised (resnet18) + std", 10.0) not in points  # one run at 10 %: no spread to draw
    import wandb

    assert wandb.run is None  # the CLI closed the run it opened


def test_reference_only_for_hyperkvasir_runs(sweep: Path, tmp_path: Path) -> None:
    """The paper's DenseNet-161 line is HyperKvasir's: runs on another data set (data.source=folder) get none."""
    other = tmp_path / "kvasir_v2"
    for fold, mcc in ((0, 0.4), (1, 0.5)):
        path = write_run(other, "supervised", 1.0, fold, 0, mcc=mcc, macro_f1=0.3, micro_f1=0.6)
        results = json.loads(path.read_text())
        results["config"]["data"] = {"source": "folder"}
        path.write_text(json.dumps(results))
    report = write_curves([other], tmp_path / "other_curves")
    assert "DenseNet-161" not in report.markdown and "0.899" not in report.markdown
    with_reference = write_curves([sweep], tmp_path / "hk_curves")
    assert "MCC 0.899" in with_reference.markdown
    # The plot differs by the reference line alone: drawn for HyperKvasir, not for the folder data set.
    from ssl_kvasir.study.curves import plot_curves

    a = plot_curves(report.summary, ["mcc"], tmp_path / "a.png", reference=False).read_bytes()
    b = plot_curves(report.summary, ["mcc"], tmp_path / "b.png", reference=True).read_bytes()
    assert a != b


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_curves_logs_line_charts_to_an_offline_wandb_run(sweep: Path, tmp_path: Path) -> None:
    """`make curves` with W&B offline (nothing configured) leaves a W&B run with a line chart of each metric."""
    repo = Path(__file__).resolve().parents[2]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    cmd = ["make", "-s", f"BIN={bin_dir}", "-o", f"{bin_dir}/ssl-kvasir", "curves", f"OUT={sweep}"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((sweep / "curves" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert record.count(b"wandb/lineseries/v0") == 6
    for metric in ("mcc", "macro_f1", "micro_f1"):
        assert list(runs[0].rglob(f"label_efficiency/{metric}_table_*.table.json")), metric
    cmd[-1:] = [f"OUT={sweep}", "WANDB=0"]
    (sweep / "curves").rename(tmp_path / "first")
    assert subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=300).returncode == 0
    assert not (sweep / "curves" / "wandb").exists()  # WANDB=0: no W&B run


def test_curves_say_which_protocol_and_validation_policy_made_each_point(tmp_path):
    from ssl_kvasir.study.curves import load_runs, render_markdown, summarize

    def write(name: str, seed: int, **fields) -> None:
        results = record(seed=seed, **fields)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))

    write("a", 0, protocol="matched", val_policy="budget")
    write("b", 1, protocol="matched", val_policy="budget")
    summary = summarize(load_runs([tmp_path], ["mcc"]), ["mcc"])
    assert (summary.protocol.tolist(), summary.val_policy.tolist()) == (["matched"], ["budget"])
    assert "Protocol: matched; validation: budget." in render_markdown(summary, ["mcc"])
    write("c", 2)  # a hand-made record that names neither
    summary = summarize(load_runs([tmp_path], ["mcc"]), ["mcc"])
    assert (summary.protocol.tolist(), summary.val_policy.tolist()) == (
        ["matched unrecorded"],
        ["budget unrecorded"],
    )
    assert "Protocol: matched, unrecorded; validation: budget, unrecorded (mixed" in render_markdown(
        summary, ["mcc"]
    )
