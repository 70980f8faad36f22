"""The side-by-side report, from hand-made results.json files, through the library and the real CLI."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_kvasir.cli import main
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.errors import DataError
from ssl_kvasir.names import LabelBudget
from ssl_kvasir.run.folder import RESULTS_FORMAT
from ssl_kvasir.study.report import write_report
from ssl_kvasir.study.results import find_results_files
from ssl_kvasir.study.table3 import TABLE_METRICS, load_result, paper_row_for_backbone, summarize_systems

SPLIT_FILE = Path(__file__).resolve().parents[3] / "shared/hyperkvasir/2_fold_split.csv"
NAMES = HYPERKVASIR_CLASSES.names


def _metrics(base: float) -> dict[str, float]:
    """Distinct known figures per metric: base + 0.01 * position."""
    keys = (*TABLE_METRICS, "balanced_accuracy", "accuracy")
    return {key: round(base + 0.01 * i, 4) for i, key in enumerate(keys)}


def _confusion(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 5, (23, 23)).tolist()


def _results(
    method: str, backbone: str, fold: int, base: float, seed: int, label_fraction: float = 1.0, **extra
) -> dict:
    return {
        "format": RESULTS_FORMAT,
        "method": method,
        "backbone": backbone,
        "fold": fold,
        "seed": 0,
        "label_budget": LabelBudget.from_settings(label_fraction, None).record(),
        "n_labeled": 100,
        "classes": list(NAMES),
        "metrics": _metrics(base),
        "confusion_matrix": _confusion(seed),
        "config": {},
        **extra,
    }


def _write(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two systems x two folds under one parent folder; the second system names itself (its system field) and
    lists its classes in reverse order."""
    root = tmp_path / "runs"
    _write(root / "r50_f0", _results("supervised", "resnet50", 0, 0.50, seed=1))
    _write(root / "r50_f1", _results("supervised", "resnet50", 1, 0.60, seed=2))
    for fold, base in ((0, 0.70), (1, 0.80)):
        results = _results("supervised", "resnet152+densenet161", fold, base, seed=10 + fold)
        order = np.arange(23)[::-1]
        results["classes"] = [NAMES[i] for i in order]
        paper_cm = np.array(results["confusion_matrix"])
        results["confusion_matrix"] = paper_cm[np.ix_(order, order)].tolist()  # same counts, reversed order
        results["system"] = "ensemble-avg"
        _write(root / f"ens_f{fold}", results)
    return root


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["system"]: row for row in csv.DictReader(f)}


def test_report_averages_folds_and_compares_with_paper(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    table = _read_csv(out / "table3.csv")
    assert set(table) == {"supervised-resnet50", "ensemble-avg"}

    r50 = table["supervised-resnet50"]
    assert r50["paper_row"] == "ResNet-50" and r50["folds"] == "0 1" and r50["runs"] == "2"
    # macro P: folds 0.50 and 0.60 -> 0.55; the paper's 0.589; difference -0.039.
    assert float(r50["macro_precision"]) == pytest.approx(0.55)
    assert float(r50["macro_precision_paper"]) == pytest.approx(0.589)
    assert float(r50["macro_precision_diff"]) == pytest.approx(0.55 - 0.589)
    # MCC is the first metric key: 0.55 + 0.06 = 0.61 vs 0.826.
    assert float(r50["mcc"]) == pytest.approx(0.61 + 0.0)
    assert float(r50["mcc_diff"]) == pytest.approx(0.61 - 0.826)
    # micro P has no figure of its own in the paper: it carries micro F1 (one label per image).
    assert float(r50["micro_precision_paper"]) == pytest.approx(0.839)
    assert r50["note"] == ""

    ens = table["ensemble-avg"]
    assert ens["paper_row"] == "ResNet-152 + DenseNet-161 averaged"
    assert float(ens["macro_f1"]) == pytest.approx(0.77)  # folds 0.72 and 0.82
    assert float(ens["macro_f1_diff"]) == pytest.approx(0.77 - 0.617)

    markdown = (out / "table3.md").read_text()
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| system"))
    assert "macro P" in header and "micro R" in header and "MCC" in header
    row = next(line for line in lines if line.startswith("| supervised-resnet50 |"))
    assert row.count("|") == header.count("|")
    assert "0.550 / 0.589 (-0.039)" in row
    assert "A barretts" in markdown and "W ulcerative-colitis-grade-3" in markdown

    for name in ("supervised-resnet50", "ensemble-avg"):
        with Image.open(out / f"confusion_{name}.png") as image:
            assert image.format == "PNG" and image.width > 300


def test_confusion_is_summed_in_paper_order(runs: Path) -> None:
    systems = {s.name: s for s in summarize_systems([load_result(p) for p in find_results_files([runs])])}
    ens = systems["ensemble-avg"]
    # The files list classes in reverse order; the summary is back in the paper's order A..W.
    assert ens.classes == NAMES
    np.testing.assert_array_equal(ens.confusion, np.array(_confusion(10)) + np.array(_confusion(11)))
    np.testing.assert_array_equal(
        systems["supervised-resnet50"].confusion, np.array(_confusion(1)) + np.array(_confusion(2))
    )


def test_missing_fold_and_repeated_seeds_are_noted(runs: Path, tmp_path: Path) -> None:
    _write(runs / "fix_f0", _results("fixmatch", "resnet50", 0, 0.40, seed=3, label_fraction=0.1))
    _write(runs / "r50_f0_seed1", _results("supervised", "resnet50", 0, 0.30, seed=4))
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    table = _read_csv(out / "table3.csv")
    fix = table["fixmatch-resnet50-frac0.1"]
    assert "WARNING: no run for fold 1" in fix["note"]
    assert float(fix["macro_precision"]) == pytest.approx(0.40)
    r50 = table["supervised-resnet50"]
    # Fold 0 is the mean of its two seeds (0.50, 0.30) = 0.40, then the folds: (0.40 + 0.60) / 2.
    assert float(r50["macro_precision"]) == pytest.approx(0.50)
    assert "fold 0: mean of 2 runs" in r50["note"]
    assert "WARNING: no run for fold 1" in (out / "table3.md").read_text()


def test_report_with_split_file_adds_baselines(runs: Path, tmp_path: Path) -> None:
    if not SPLIT_FILE.is_file():
        pytest.skip(f"the official split file is not at {SPLIT_FILE}")
    rows = write_report([runs], tmp_path / "out", split_file=SPLIT_FILE, n_random_repeats=5)
    assert [r.system for r in rows] == [
        "supervised-resnet50",
        "ensemble-avg",
        "majority class",
        "random guessing",
    ]
    table = _read_csv(tmp_path / "out" / "table3.csv")
    assert float(table["majority class"]["micro_f1"]) == pytest.approx(
        (574 / 5_324 + 574 / 5_338) / 2, abs=1e-4
    )
    assert table["majority class"]["mcc_paper"] == ""  # the paper's "n/a"
    assert "0.000 / n/a" in (tmp_path / "out" / "table3.md").read_text()


def test_paper_rows_by_backbone() -> None:
    assert paper_row_for_backbone("resnet50") == "ResNet-50"
    assert paper_row_for_backbone("resnet152.tv_in1k") == "ResNet-152"
    assert paper_row_for_backbone("DenseNet161") == "DenseNet-161"
    assert paper_row_for_backbone("resnet152+densenet161+mlp") == "ResNet-152 + DenseNet-161 + MLP"
    assert paper_row_for_backbone("resnet18") is None


def _break(results: dict, how: str) -> dict | str:
    results = copy.deepcopy(results)
    if how == "not json":
        return "{not json"
    if how == "not an object":
        return "[1, 2]"
    if how == "no metrics":
        del results["metrics"]
    elif how == "metric lacks mcc":
        del results["metrics"]["mcc"]
    elif how == "metric is text":
        results["metrics"]["macro_f1"] = "0.5"
    elif how == "confusion not square":
        results["confusion_matrix"] = results["confusion_matrix"][:-1]
    elif how == "negative count":
        results["confusion_matrix"][0][0] = -1
    elif how == "fold negative":
        results["fold"] = -1
    elif how == "unversioned":
        del results["format"]
    return json.dumps(results)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("not json", "not valid JSON"),
        ("not an object", "expected a JSON object"),
        ("no metrics", "missing field 'metrics'"),
        ("metric lacks mcc", "lacks 'mcc'"),
        ("metric is text", "metrics.macro_f1"),
        ("confusion not square", "23x23"),
        ("negative count", "non-negative integer counts"),
        ("fold negative", "'fold'"),
        ("unversioned", "unversioned results file"),
    ],
)
def test_malformed_results_give_a_clean_cli_error(
    runs: Path, tmp_path: Path, capsys, how: str, message: str
) -> None:
    bad = runs / "r50_f1" / "results.json"
    bad.write_text(_break(json.loads(bad.read_text()), how))
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and message in err, err
    assert not (tmp_path / "out" / "table3.csv").exists()


def test_missing_run_folder_and_mixed_system(runs: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "no results.json" in capsys.readouterr().err
    _write(runs / "odd", _results("supervised", "resnet18", 0, 0.1, seed=5, system="ensemble-avg"))
    with pytest.raises(DataError, match="mixes backbones"):
        write_report([runs], tmp_path / "out")


def test_rare_class_recall_beside_macro_and_micro_scores(runs: Path, tmp_path: Path) -> None:
    """The ten rarest classes (fewest evaluation images over all systems) and each system's recall on them,
    checked against a naive loop over the summed confusion matrices."""
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    summed = {
        "supervised-resnet50": np.array(_confusion(1)) + np.array(_confusion(2)),
        "ensemble-avg": np.array(_confusion(10)) + np.array(_confusion(11)),
    }
    support = [sum(int(cm[c].sum()) for cm in summed.values()) for c in range(23)]
    rarest = sorted(range(23), key=lambda c: (support[c], c))[:10]
    with (out / "rare_classes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 10
    for row in rows:
        c = rarest[int(row["rank"]) - 1]
        assert row["class"] == NAMES[c] and int(row["support"]) == support[c]
        cm = summed[row["system"]]
        expected = cm[c, c] / cm[c].sum() if cm[c].sum() else None
        assert (
            (row["recall"] == "")
            if expected is None
            else float(row["recall"]) == pytest.approx(expected, abs=1e-4)
        )

    markdown = (out / "table3.md").read_text()
    assert "## Recall of the 10 rarest classes" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| system | macro R"))
    assert f"{NAMES[rarest[0]]} ({support[rarest[0]]})" in header and "mean recall, 10 rarest" in header
    row = [line for line in markdown.splitlines() if line.startswith("| ensemble-avg |")][-1]  # below Table 3
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    cm = summed["ensemble-avg"]
    recalls = [cm[c, c] / cm[c].sum() for c in rarest if cm[c].sum()]
    # Scores beside it: macro R, macro F1, micro F1, MCC of folds 0.70 / 0.80 (base + 0.01 * position).
    assert [float(v) for v in cells[1:5]] == pytest.approx([0.76, 0.77, 0.80, 0.81])
    assert float(cells[5]) == pytest.approx(np.mean(recalls), abs=1e-3)
    assert [float(v) for v in cells[6:] if v != "-"] == pytest.approx(recalls, abs=1e-3)
