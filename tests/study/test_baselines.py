"""The paper's trivial baselines, from its real split file and from tiny hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_kvasir.cli import main
from ssl_kvasir.data.archive import read_split_file
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.metrics import METRIC_KEYS, classification_metrics
from ssl_kvasir.study.baselines import (
    PAPER_TABLE3,
    majority_class_baseline,
    random_guess_repeats,
    split_file_baselines,
)

SPLIT_FILE = Path(__file__).resolve().parents[3] / "shared/hyperkvasir/2_fold_split.csv"
PAPER_KEYS = ("macro_precision", "macro_recall", "macro_f1", "micro_f1", "mcc")


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    if not SPLIT_FILE.is_file():
        pytest.skip(f"the official split file is not at {SPLIT_FILE}")
    frame = read_split_file(SPLIT_FILE, HYPERKVASIR_CLASSES)
    return frame.label.to_numpy(), frame.fold.to_numpy()


def test_split_file_facts(split) -> None:
    labels, folds = split
    assert len(labels) == 10_662
    assert len(np.unique(labels)) == 23
    assert np.bincount(folds).tolist() == [5_324, 5_338]


def test_majority_reproduces_paper_row(split) -> None:
    labels, folds = split
    ours = majority_class_baseline(labels, folds, 23)
    # Hand-derived: each fold's majority class is bbps-2-3 (index 2, 574 images in each fold).
    accuracy = (574 / 5_324 + 574 / 5_338) / 2
    assert ours["micro_f1"] == pytest.approx(accuracy)
    assert ours["macro_precision"] == pytest.approx(accuracy / 23)
    assert ours["macro_recall"] == pytest.approx(1 / 23)
    assert ours["mcc"] == 0.0
    paper = PAPER_TABLE3["majority class"]
    for key in ("macro_precision", "macro_recall", "macro_f1", "micro_f1"):
        # The paper rounds down in places: 0.0047 is printed as 0.004, so allow one unit of the last digit.
        assert abs(ours[key] - paper[key]) < 0.001, (key, ours[key], paper[key])
    assert paper["mcc"] is None


def test_random_guessing_matches_paper_within_noise(split) -> None:
    labels, folds = split
    repeats = random_guess_repeats(labels, folds, 23, seed=0, n_repeats=200)
    paper = PAPER_TABLE3["random guessing"]
    for key in PAPER_KEYS:
        values = np.array([r[key] for r in repeats])
        mean, std = values.mean(), values.std(ddof=1)
        assert std > 0, key
        # The paper's row is one draw of the two folds: it should lie within the spread of one repeat.
        assert abs(paper[key] - mean) < 3 * std, (key, paper[key], mean, std)
    # Expected values: uniform guessing has accuracy and mean recall 1/C, and MCC 0.
    for key, expected in (("micro_f1", 1 / 23), ("macro_recall", 1 / 23), ("mcc", 0.0)):
        values = np.array([r[key] for r in repeats])
        assert abs(values.mean() - expected) < 4 * values.std(ddof=1) / np.sqrt(len(values)), key


def test_random_guessing_averages_its_repeats_and_is_seeded(split) -> None:
    labels, folds = split
    repeats = random_guess_repeats(labels, folds, 23, seed=5, n_repeats=4)
    _, random_row = split_file_baselines(SPLIT_FILE, seed=5, n_repeats=4)
    for key in METRIC_KEYS:
        assert random_row.metrics[key] == pytest.approx(np.mean([r[key] for r in repeats]))
        assert random_row.std[key] == pytest.approx(np.std([r[key] for r in repeats], ddof=1))
    assert random_guess_repeats(labels, folds, 23, seed=5) == repeats[:1]
    assert random_guess_repeats(labels, folds, 23, seed=6) != repeats[:1]


def test_majority_on_tiny_three_fold_split_equals_naive() -> None:
    labels = np.array([0, 0, 1, 2, 1, 1, 2, 2, 2, 0, 1, 3])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    per_fold = []
    for k in range(3):
        train = labels[folds != k]
        counts = {c: int((train == c).sum()) for c in range(5)}
        majority = max(counts, key=lambda c: (counts[c], -c))  # most frequent, lowest index on a tie
        evaluate = labels[folds == k]
        per_fold.append(classification_metrics(evaluate, np.full(evaluate.size, majority), 5))
    ours = majority_class_baseline(labels, folds, 5)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(np.mean([m[key] for m in per_fold])), key


def test_baselines_reject_a_single_fold() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        majority_class_baseline(np.array([0, 1]), np.array([0, 0]), 2)
    with pytest.raises(ValueError, match="n_repeats"):
        random_guess_repeats(np.array([0, 1]), np.array([0, 1]), 2, seed=0, n_repeats=0)


def test_split_file_baselines_and_cli(split, tmp_path, capsys) -> None:
    results = split_file_baselines(SPLIT_FILE, seed=0, n_repeats=10)
    assert [r.name for r in results] == ["majority class", "random guessing"]
    assert results[0].std is None and results[1].std["micro_f1"] > 0
    assert results[0].folds == (0, 1)

    assert main(["baselines", "--split-file", str(SPLIT_FILE), "--seeds", "10", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["rows"]
    assert printed["majority class"]["ours"]["micro_f1"] == pytest.approx(results[0].metrics["micro_f1"])
    assert printed["random guessing"]["ours"]["macro_f1"] == pytest.approx(results[1].metrics["macro_f1"])
    assert printed["majority class"]["paper"]["macro_precision"] == 0.004
    assert printed["majority class"]["paper"]["mcc"] is None

    assert main(["baselines", "--split-file", str(SPLIT_FILE), "--seeds", "5"]) == 0
    text = capsys.readouterr().out
    assert "| majority class |" in text and "| random guessing |" in text and "0.108 / 0.108" in text

    bad = tmp_path / "split.csv"
    bad.write_text("file-name,class-name,split-index\n")
    assert main(["baselines", "--split-file", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
