"""Composition counts and agreement matrices against naive counts; ``ssl-kvasir composition`` end to end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.analysis.composition import agreement_matrix, composition_table
from ssl_kvasir.cli import main
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.errors import DataError
from ssl_kvasir.pseudo_labels.table import (
    build_pseudo_label_table,
    write_authors_predictions,
    write_pseudo_labels,
)


def test_composition_equals_naive_count() -> None:
    rng = np.random.default_rng(0)
    sources = {"authors": rng.integers(0, 23, size=500), "ours": rng.integers(0, 5, size=80)}
    table = composition_table(sources)
    assert list(table.columns) == ["class", "letter", "authors", "ours"]
    assert list(table["class"]) == HYPERKVASIR_CLASSES.names and table.letter[22] == "W"
    for name, predicted in sources.items():
        counts = Counter(predicted.tolist())
        assert list(table[name]) == [counts.get(c, 0) for c in range(23)]
    with pytest.raises(DataError, match="source 'x': predicted class indices must lie in 0..22"):
        composition_table({"x": np.array([23])})


def test_agreement_equals_naive_loop() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, size=300), rng.integers(0, 4, size=300)
    b[:100] = a[:100]
    matrix, rate = agreement_matrix(a, b, 4, names=["w", "x", "y", "z"])
    expected = np.zeros((4, 4), int)
    for i, j in zip(a, b, strict=True):
        expected[i, j] += 1
    np.testing.assert_array_equal(matrix.to_numpy(), expected)
    assert list(matrix.index) == list(matrix.columns) == ["w", "x", "y", "z"]
    assert rate == pytest.approx(sum(int(i == j) for i, j in zip(a, b, strict=True)) / 300)


def _prediction_files(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    names = [f"{i:03d}.jpg" for i in range(60)]
    authors_probs = rng.dirichlet(np.ones(23) * 0.2, size=60)  # (60, 23)
    ours_probs = authors_probs.copy()
    ours_probs[:20] = rng.dirichlet(np.ones(23) * 0.2, size=20)  # a third of the images differ
    authors = tmp_path / "in" / "authors.csv"
    write_authors_predictions(authors, names, authors_probs)
    # Our export lists the images in another order, and 10 of them are missing.
    order = rng.permutation(60)[:50]
    table = build_pseudo_label_table(
        [f"unlabeled-images/images/{names[i]}" for i in order], ours_probs[order]
    )
    ours = write_pseudo_labels(table, tmp_path / "in" / "ours.csv")
    return authors, ours, authors_probs.argmax(axis=1), ours_probs.argmax(axis=1)[order]


def test_composition_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    authors, ours, authors_pred, ours_pred = _prediction_files(tmp_path)
    out = tmp_path / "report"
    assert main(["composition", "--predictions", str(authors), str(ours), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("composition.csv", "composition.png", "agreement.csv", "agreement_authors_vs_ours.csv"):
        assert (out / name).is_file() and f"-> {out / name}" in printed
    assert (out / "composition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "composition.csv")
    assert list(table.authors) == [Counter(authors_pred.tolist()).get(c, 0) for c in range(23)]
    assert list(table.ours) == [Counter(ours_pred.tolist()).get(c, 0) for c in range(23)]
    matrix = pd.read_csv(out / "agreement_authors_vs_ours.csv", index_col=0)
    assert matrix.to_numpy().sum() == 50  # the shared images only
    by_name = dict(zip([f"{i:03d}.jpg" for i in range(60)], authors_pred, strict=True))
    ours_frame = pd.read_csv(ours)
    expected = np.zeros((23, 23), int)
    for name, c in zip(ours_frame.filename, ours_frame.paper_index, strict=True):
        expected[by_name[name], c] += 1
    np.testing.assert_array_equal(matrix.to_numpy(), expected)
    summary = pd.read_csv(out / "agreement.csv")
    assert summary.n_common[0] == 50 and summary.n_agree[0] == np.trace(expected)
    assert f"authors vs ours: {np.trace(expected)} of 50 shared images agree" in printed


def test_composition_cli_reports_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file-name;class-name;split-index\n")
    assert main(["composition", "--predictions", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "columns do not match" in err
    authors, ours, *_ = _prediction_files(tmp_path)
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "authors.csv"
    twin.write_bytes(authors.read_bytes())
    assert main(["composition", "--predictions", str(authors), str(twin), "--out", str(tmp_path / "o")]) == 2
    assert "same name 'authors'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_files_without_shared_images_cannot_be_compared(tmp_path: Path) -> None:
    from ssl_kvasir.analysis.composition import write_composition_report

    probs = np.full((2, 23), 1 / 23)
    write_authors_predictions(tmp_path / "a.csv", ["1.jpg", "2.jpg"], probs)
    write_authors_predictions(tmp_path / "b.csv", ["3.jpg", "4.jpg"], probs)
    with pytest.raises(DataError, match="a.csv and .*b.csv share no file name"):
        write_composition_report([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "out")
