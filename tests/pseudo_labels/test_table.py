"""Pseudo-label tables and the authors' prediction-file format: round trips, bad inputs, atomic writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.pseudo_labels import table as table_module
from ssl_kvasir.pseudo_labels.table import (
    PSEUDO_LABEL_COLUMNS,
    build_pseudo_label_table,
    read_authors_predictions,
    read_pseudo_labels,
    select_pseudo_labels,
    write_authors_predictions,
    write_pseudo_labels,
)

# Hand-written in the authors' format: comma-separated, bare file name, index 0..22, 23 probabilities with
# 3 decimals, '\n' line ends.
AUTHORS_SAMPLE = (
    "filename,predicted-label,A,B,C,D,E,F,G,H,I,J,K,L,M,N,O,P,Q,R,S,T,U,V,W\n"
    "00028ab5-1e41-4a33-a1b7-30eac2d4bd22.jpg,2,"
    "0.000,0.004,0.995,0.000,0.000,0.000,0.000,0.001,0.000,0.000,0.000,0.000,"
    "0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000\n"
    "0a1f43c8-5b5e-4b6d-9a43-4c0e9f8b7d10.jpg,13,"
    "0.012,0.000,0.001,0.103,0.027,0.000,0.002,0.000,0.031,0.000,0.000,0.000,"
    "0.000,0.811,0.000,0.000,0.000,0.004,0.006,0.002,0.000,0.001,0.000\n"
    "ffe2b0a9-77c1-4d8e-8c1e-2f9a0d6b5e33.jpg,8,"
    "0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,1.000,0.000,0.000,0.000,"
    "0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000\n"
)


def _sample(tmp_path: Path, text: str = AUTHORS_SAMPLE, name: str = "authors.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_authors_sample_is_well_formed() -> None:
    lines = AUTHORS_SAMPLE.splitlines()
    assert all(len(line.split(",")) == 25 for line in lines)


def test_authors_file_round_trips_byte_for_byte(tmp_path: Path) -> None:
    frame = read_authors_predictions(_sample(tmp_path))
    assert list(frame.columns[:3]) == ["filename", "paper_index", "predicted_class"]
    assert list(frame.paper_index) == [2, 13, 8]
    assert list(frame.predicted_class) == ["bbps-2-3", "polyps", "cecum"]
    assert frame.loc[1, "N"] == pytest.approx(0.811)
    out = tmp_path / "again.csv"
    write_authors_predictions(
        out, frame.filename, frame[HYPERKVASIR_CLASSES.letters].to_numpy(), frame.paper_index
    )
    assert out.read_bytes() == AUTHORS_SAMPLE.encode()


def test_authors_writer_rounds_and_defaults_to_argmax(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(23) * 0.2, size=40)  # (40, 23)
    names = [f"unlabeled-images/images/{i}.jpg" for i in range(40)]  # reduced to bare names
    path = tmp_path / "pred.csv"
    write_authors_predictions(path, names, probs)
    back = read_authors_predictions(path)
    assert list(back.filename) == [f"{i}.jpg" for i in range(40)]
    np.testing.assert_array_equal(back.paper_index, probs.argmax(axis=1))
    np.testing.assert_allclose(back[HYPERKVASIR_CLASSES.letters].to_numpy(), probs, atol=0.0005 + 1e-12)
    second_field = path.read_text().splitlines()[1].split(",")[2]
    assert len(second_field.split(".")[1]) == 3


def _replace_line(line_no: int, old: str, new: str) -> str:
    lines = AUTHORS_SAMPLE.split("\n")
    lines[line_no - 1] = lines[line_no - 1].replace(old, new, 1)
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (AUTHORS_SAMPLE.replace("predicted-label", "label", 1), ":1: header is 'filename,label,"),
        (AUTHORS_SAMPLE.replace(",", ";"), ":1: header is"),
        (_replace_line(3, ",13,", ",23,"), ":3: predicted-label '23' is not a class index 0..22"),
        (_replace_line(3, ",13,", ",-1,"), ":3: predicted-label '-1'"),
        (_replace_line(4, ",1.000,", ",abc,"), ":4: probability 'abc' is not a number"),
        (_replace_line(2, ",0.995,", ",1.995,"), ":2: probability 1.995 is outside"),
        (
            _replace_line(4, "ffe2b0a9-77c1-4d8e-8c1e-2f9a0d6b5e33", "00028ab5-1e41-4a33-a1b7-30eac2d4bd22"),
            ":4: file name .* listed twice \\(first on line 2\\)",
        ),
        (_replace_line(2, ",0.995,", ","), ":2: expected 25 comma-separated fields, got 24"),
        (_replace_line(2, "00028ab5", "images/00028ab5"), ":2: file name 'images/00028ab5.* bare file name"),
        (AUTHORS_SAMPLE.split("\n")[0] + "\n", "lists no images"),
        ("", ":1: header is '\\(empty\\)'"),
    ],
)
def test_bad_authors_files_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _sample(tmp_path, text, "bad.csv")
    with pytest.raises(DataError, match=f"{path}{message}" if message.startswith(":") else message) as info:
        read_authors_predictions(path)
    assert str(path) in str(info.value)


def test_missing_prediction_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv does not exist"):
        read_authors_predictions(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="nope.csv does not exist"):
        read_pseudo_labels(tmp_path / "nope.csv")


def _random_table(
    n: int = 30, seed: int = 0, knn: bool = True, clusters: bool = True
) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(23) * 0.3, size=n)  # (n, 23)
    probs[0] = 0.0
    probs[0, 5] = 1.0  # a certain prediction: entropy 0, margin 1
    table = build_pseudo_label_table(
        [f"unlabeled-images/images/{i:03d}.jpg" for i in range(n)],
        probs,
        knn_probs=rng.dirichlet(np.ones(23) * 0.3, size=n) if knn else None,
        clusters=rng.integers(-1, 4, size=n) if clusters else None,
        outlier_scores=rng.random(n) if clusters else None,
        checkpoint="runs/fixmatch/last.ckpt",
    )
    return table, probs


def test_table_columns_equal_naive_computations() -> None:
    table, probs = _random_table()
    assert list(table.columns) == PSEUDO_LABEL_COLUMNS
    for i, row in enumerate(table.itertuples()):
        p = list(probs[i])
        best = max(range(23), key=lambda c: p[c])
        second = sorted(p, reverse=True)[1]
        assert row.paper_index == best and row.predicted_class == HYPERKVASIR_CLASSES[best].folder
        assert row.confidence == pytest.approx(p[best])
        assert row.margin == pytest.approx(p[best] - second)
        assert row.entropy == pytest.approx(-sum(x * math.log(x) for x in p if x > 0))
        assert row.filename == f"{i:03d}.jpg"
        assert row.knn_agrees == (row.knn_class == row.predicted_class)
    assert table.entropy[0] == 0.0 and table.margin[0] == 1.0


def test_table_without_knn_or_clusters_has_empty_columns(tmp_path: Path) -> None:
    table, _ = _random_table(knn=False, clusters=False)
    assert (table.knn_class == "").all() and table.knn_agrees.isna().all() and table.cluster.isna().all()
    path = write_pseudo_labels(table, tmp_path / "pl.csv")
    assert path.read_text().splitlines()[1].endswith(",,,,,runs/fixmatch/last.ckpt")


@pytest.mark.parametrize(("knn", "clusters"), [(True, True), (False, False)])
def test_export_round_trips(
    tmp_path: Path, knn: bool, clusters: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_module, "CHUNK_ROWS", 7)  # several chunks
    table, _ = _random_table(n=30, knn=knn, clusters=clusters)
    write_pseudo_labels(table, tmp_path / "pl.csv")
    back = read_pseudo_labels(tmp_path / "pl.csv")
    pd.testing.assert_frame_equal(back, table)
    assert (tmp_path / "pl.csv").read_text().count("\n") == 31


def test_authors_export_of_a_table_reads_back(tmp_path: Path) -> None:
    table, probs = _random_table()
    kept = select_pseudo_labels(table, min_confidence=0.3)
    write_pseudo_labels(kept, tmp_path / "authors.csv", format="authors", probs=probs[kept.index])
    back = read_pseudo_labels(tmp_path / "authors.csv")
    assert list(back.filename) == list(kept.filename)
    np.testing.assert_array_equal(back.paper_index, kept.paper_index)
    np.testing.assert_allclose(back.confidence, kept.confidence, atol=0.0005 + 1e-12)
    assert (back.checkpoint == str(tmp_path / "authors.csv")).all()
    with pytest.raises(ConfigError, match="needs the class probabilities"):
        write_pseudo_labels(kept, tmp_path / "x.csv", format="authors")
    with pytest.raises(ConfigError, match="unknown pseudo-label format"):
        write_pseudo_labels(kept, tmp_path / "x.csv", format="json")


def test_select_equals_naive_filter() -> None:
    table, _ = _random_table(n=200, seed=3)
    for min_conf, top_k, agree in [
        (0.0, None, False),
        (0.4, None, False),
        (0.2, 3, False),
        (0.0, 2, True),
        (0.3, 1, True),
    ]:
        kept = select_pseudo_labels(
            table, min_confidence=min_conf, top_k_per_class=top_k, require_agreement=agree
        )
        rows = [r for r in table.itertuples() if r.confidence >= min_conf and (not agree or r.knn_agrees)]
        if top_k is not None:
            chosen = []
            for c in range(23):
                ranked = sorted(
                    (r for r in rows if r.paper_index == c), key=lambda r: (-r.confidence, r.Index)
                )
                chosen += ranked[:top_k]
            rows = sorted(chosen, key=lambda r: r.Index)
        assert list(kept.index) == [r.Index for r in rows], (min_conf, top_k, agree)


def test_select_needs_knn_for_agreement() -> None:
    table, _ = _random_table(knn=False)
    with pytest.raises(ConfigError, match="no kNN vote"):
        select_pseudo_labels(table, require_agreement=True)


def _written(tmp_path: Path) -> Path:
    table, _ = _random_table(n=5)
    return write_pseudo_labels(table, tmp_path / "pl.csv")


def _edit(path: Path, column: str, row: int, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False, lineterminator="\n")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("predicted_class", "polyp-ish", ":4: predicted_class 'polyp-ish' is not a class name"),
        ("paper_index", "0", ":4: paper_index '0' is not the index of its predicted_class"),
        ("confidence", "1.5", ":4: confidence '1.5' is outside \\[0, 1\\]"),
        ("entropy", "", ":4: entropy '' is not a number"),
        ("margin", "wide", ":4: margin 'wide' is not a number"),
        ("knn_class", "colon", ":4: knn_class 'colon' is not a class name"),
        ("knn_agrees", "yes", ":4: knn_agrees 'yes' is not True, False or empty"),
        ("cluster", "1.5", ":4: cluster '1.5' is not an integer"),
        ("outlier_score", "x", ":4: outlier_score 'x' is not a number"),
        ("path", "unlabeled-images/images/000.jpg", ":4: path .* is listed twice"),
    ],
)
def test_bad_pseudo_label_files_name_the_file_and_line(
    tmp_path: Path, column: str, value: str, message: str
) -> None:
    path = _written(tmp_path)
    _edit(path, column, 2, value)
    with pytest.raises(DataError, match=f"{path}{message}"):
        read_pseudo_labels(path)


def test_pseudo_label_columns_are_checked(tmp_path: Path) -> None:
    path = _written(tmp_path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns="margin")
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=f"{path}: columns .*missing: \\['margin'\\]"):
        read_pseudo_labels(path)


def test_split_file_spelling_is_accepted_and_canonicalised(tmp_path: Path) -> None:
    path = _written(tmp_path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[0, ["predicted_class", "paper_index"]] = ["hemorroids", "5"]
    frame.to_csv(path, index=False)
    assert read_pseudo_labels(path).predicted_class[0] == "hemorrhoids"


def test_unwritable_path_leaves_nothing(tmp_path: Path) -> None:
    table, probs = _random_table(n=5)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="a-file"):
        write_pseudo_labels(table, blocker / "pl.csv")
    with pytest.raises(OSError):
        write_authors_predictions(blocker / "pred.csv", table.filename, probs)
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failure_halfway_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "CHUNK_ROWS", 2)
    path = tmp_path / "pred.csv"
    path.write_text("old contents\n")
    probs = np.full((6, 23), 1 / 23)
    probs[5, 0] = np.nan  # discovered in the third chunk, after two chunks were written
    with pytest.raises(DataError, match="rows 4..5 are not all in \\[0, 1\\]"):
        write_authors_predictions(path, [f"{i}.jpg" for i in range(6)], probs)
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]  # no temporary file left behind
    with pytest.raises(DataError, match="cannot be written unquoted"):
        write_authors_predictions(tmp_path / "comma.csv", ["a,b.jpg"], np.full((1, 23), 1 / 23))
    assert not (tmp_path / "comma.csv").exists()
