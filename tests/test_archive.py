"""The class table, archive scanning, split files and `ssl-kvasir check`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_kvasir.cli import main
from ssl_kvasir.data.archive import load_catalog, read_split_file, stratified_folds
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "hyperkvasir"
needs_shared = pytest.mark.skipif(not (SHARED / "2_fold_split.csv").is_file(), reason=f"{SHARED} is absent")


@needs_shared
def test_class_table_matches_the_shared_class_table():
    with (SHARED / "classes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(HYPERKVASIR_CLASSES) == 23
    by_letter = {r["paper_letter"]: r for r in rows}
    for c in HYPERKVASIR_CLASSES:
        r = by_letter[c.letter]
        assert (c.folder, c.split_name, c.tract, c.category) == (
            r["folder"],
            r["split_csv_name"],
            r["tract"],
            r["category"],
        )
        assert (
            HYPERKVASIR_CLASSES.index(r["split_csv_name"])
            == HYPERKVASIR_CLASSES.index(r["folder"])
            == c.index
        )


def test_lookup_accepts_both_spellings_and_lists_valid_names():
    assert HYPERKVASIR_CLASSES.index("hemorroids") == HYPERKVASIR_CLASSES.index("Hemorrhoids") == 5
    assert HYPERKVASIR_CLASSES.index("normal-z-line") == HYPERKVASIR_CLASSES.index("z-line")
    with pytest.raises(KeyError, match="valid names: barretts, bbps-0-1"):
        HYPERKVASIR_CLASSES.index("polypz")
    with pytest.raises(ValueError, match="used by two classes"):
        ClassTable.from_names(["a", "A"])


@needs_shared
def test_official_split_file():
    split = read_split_file(SHARED / "2_fold_split.csv", HYPERKVASIR_CLASSES)
    assert len(split) == 10_662
    assert split.label.nunique() == 23
    assert np.bincount(split.fold).tolist() == [5_324, 5_338]
    with (SHARED / "classes.csv").open() as f:
        expected = {r["folder"]: (int(r["n_fold0"]), int(r["n_fold1"])) for r in csv.DictReader(f)}
    for c in HYPERKVASIR_CLASSES:
        mine = split[split.label == c.index]
        assert ((mine.fold == 0).sum(), (mine.fold == 1).sum()) == expected[c.folder]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file-name,class-name,split-index\na.jpg,polyp,0\n", "header"),
        ("file-name;class-name;split-index\na.jpg;polypz;0\n", r":2: unknown class name 'polypz'"),
        ("file-name;class-name;split-index\n../a.jpg;polyp;0\n", "bare file name"),
        ("file-name;class-name;split-index\nsub/a.jpg;polyp;0\n", "bare file name"),
        ("file-name;class-name;split-index\na.jpg;polyp;0\na.jpg;ileum;1\n", "listed twice"),
        ("file-name;class-name;split-index\na.jpg;polyp;x\n", "split-index"),
        ("file-name;class-name;split-index\na.jpg;polyp\n", "expected 3"),
        ("file-name;class-name;split-index\n", "lists no images"),
    ],
)
def test_bad_split_files(tmp_path, text, message):
    path = _write(tmp_path / "split.csv", text)
    with pytest.raises(DataError, match=message) as e:
        read_split_file(path, HYPERKVASIR_CLASSES)
    assert str(path) in str(e.value)


def test_catalog_of_synthetic_archive(synth_archive):
    cat = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    assert cat.problems == []
    s = cat.summary()
    assert s["labeled"] == 6 * 23 and s["unlabeled"] == 60
    assert set(s["classes"].values()) == {6}
    assert sum(s["folds"].values()) == s["labeled"] and len(s["folds"]) == 2
    assert (cat.images.label.to_numpy()[: s["labeled"]] >= 0).all()  # labeled rows first


def test_not_an_archive_and_no_split(tmp_path, synth_archive):
    with pytest.raises(DataError, match="not a HyperKvasir archive"):
        load_catalog(tmp_path, split_file=None, generate_folds=2)
    with pytest.raises(DataError, match="data.generate_folds"):
        load_catalog(synth_archive)


def test_problems_are_reported_not_lost(tmp_path, synth_archive):
    root = tmp_path / "archive"
    shutil.copytree(synth_archive, root)
    split = root / "2_fold_split.csv"
    lines = split.read_text().splitlines()
    lines.append("00000000-dead-beef-0000-000000000000.jpg;polyp;0")  # an entry with no image
    split.write_text("\n".join(lines) + "\n")
    polyps = root / "labeled-images/lower-gi-tract/pathological-findings/polyps"
    first = sorted(polyps.iterdir())[0]
    shutil.copy(first, polyps / "not-in-split.jpg")  # an image with no entry
    ileum = root / "labeled-images" / HYPERKVASIR_CLASSES[HYPERKVASIR_CLASSES.index("ileum")].archive_dir
    shutil.copy(first, ileum / first.name)  # a duplicate file name
    weird = root / "labeled-images/lower-gi-tract/pathological-findings/mystery"
    weird.mkdir()
    shutil.copy(first, weird / "x.jpg")  # unknown class folder
    for p in (root / "unlabeled-images/images").iterdir():
        p.unlink()  # empty unlabeled folder
    cat = load_catalog(root, split_file=split)
    text = "\n".join(cat.problems)
    assert "not in the split file" in text and "not-in-split.jpg" in text
    assert "have no image in the archive" in text and "dead-beef" in text
    assert f"duplicate file name {first.name}" in text
    assert "unknown class folder" in text and "mystery" in text
    assert "no unlabeled images" in text
    assert (
        not (cat.images.filename == first.name).any()
        or (cat.images[cat.images.filename == first.name].fold == -1).all()
    )

    code = main(["check", "--root", str(root), "--split-file", str(split), "--json"])
    assert code == 1


def test_check_cli_json(synth_archive, capsys):
    assert (
        main(
            [
                "check",
                "--root",
                str(synth_archive),
                "--split-file",
                str(synth_archive / "2_fold_split.csv"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["labeled"] == 138 and out["unlabeled"] == 60 and out["problems"] == []
    assert set(out) >= {"labeled", "unlabeled", "classes", "folds", "problems"}
    assert main(["check", "--root", str(synth_archive / "nope")]) == 2
    assert "not a HyperKvasir archive" in capsys.readouterr().err


def test_folder_source_with_generated_folds(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8)).save(tmp_path / "lab" / cls / f"{cls}{i}.png")
    (tmp_path / "unl").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "unl" / "u.jpg")
    cat = load_catalog(
        tmp_path / "lab", source="folder", generate_folds=2, fold_seed=1, unlabeled_root=tmp_path / "unl"
    )
    assert cat.classes.names == ["cats", "dogs"]
    assert len(cat.labeled) == 10 and len(cat.unlabeled) == 1
    assert all((cat.root / p).is_file() for p in cat.images.path)
    again = load_catalog(
        tmp_path / "lab", source="folder", generate_folds=2, fold_seed=1, unlabeled_root=tmp_path / "unl"
    )
    assert (cat.images.fold == again.images.fold).all()


def test_stratified_folds_balance_every_class():
    labels = np.repeat(np.arange(5), [2, 3, 10, 11, 50])
    folds = stratified_folds(labels, 2, seed=0)
    for c in range(5):
        counts = np.bincount(folds[labels == c], minlength=2)
        assert abs(counts[0] - counts[1]) <= 1
    assert (folds == stratified_folds(labels, 2, seed=0)).all()
