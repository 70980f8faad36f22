"""The class table, archive scanning, split files and `ssl-kvasir check`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_kvasir.cli import main
from ssl_kvasir.data.archive import list_images, load_catalog, read_split_file, stratified_folds
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "hyperkvasir"
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
    # Without folds (what `prepare` caches): the same images, relative to the same folder.
    root, images, problems = list_images(tmp_path / "lab", source="folder", unlabeled_root=tmp_path / "unl")
    assert root == cat.root == tmp_path and problems == []
    assert sorted(images.path) == sorted(cat.images.path) and (images.label < 0).sum() == 1


def test_list_images_without_and_with_a_split(synth_archive):
    root, images, problems = list_images(synth_archive)
    assert root == synth_archive and problems == []
    assert (images.label >= 0).sum() == 23 * 6 and (images.label < 0).sum() == 60
    with_split = list_images(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    assert with_split[0] == synth_archive and sorted(with_split[1].path) == sorted(images.path)


def test_stratified_folds_balance_every_class():
    labels = np.repeat(np.arange(5), [2, 3, 10, 11, 50])
    folds = stratified_folds(labels, 2, seed=0)
    for c in range(5):
        counts = np.bincount(folds[labels == c], minlength=2)
        assert abs(counts[0] - counts[1]) <= 1
    assert (folds == stratified_folds(labels, 2, seed=0)).all()


def _bomb_png(path: Path, width: int = 20_000, height: int = 10_000) -> None:
    """A PNG whose header claims 200 M pixels (over PIL's decompression-bomb limit) and holds one row."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def damaged_archive(tmp_path, synth_archive) -> tuple[Path, dict[str, str]]:
    """A copy of the synthetic archive with one image of each kind that cannot be used, keyed by kind."""
    root = tmp_path / "archive"
    shutil.copytree(synth_archive, root)
    cat = load_catalog(root, split_file=root / "2_fold_split.csv")
    paths = list(cat.labeled.path.iloc[[0, 10, 20, 30]]) + [cat.unlabeled.path.iloc[0]]
    kinds = dict(zip(["empty", "truncated", "not_an_image", "bomb", "appended"], paths, strict=True))
    (root / kinds["empty"]).write_bytes(b"")
    data = (root / kinds["truncated"]).read_bytes()
    (root / kinds["truncated"]).write_bytes(data[: len(data) // 2])
    (root / kinds["not_an_image"]).write_text("<html>404 Not Found</html>")
    _bomb_png(root / kinds["bomb"])
    # Not damaged: bytes after the JPEG's end marker (some cameras append data); must not be reported.
    with (root / kinds["appended"]).open("ab") as f:
        f.write(b"\x00trailing metadata" * 400)
    return root, kinds


@pytest.mark.parametrize("decode", [True, False])
def test_inspect_images_names_every_unusable_file(damaged_archive, decode) -> None:
    from ssl_kvasir.data.archive import inspect_images

    root, kinds = damaged_archive
    cat = load_catalog(root, split_file=root / "2_fold_split.csv")
    bad = inspect_images(root, list(cat.images.path), decode=decode, workers=2)
    expected = {kinds[k] for k in ("empty", "truncated", "not_an_image", "bomb")}
    assert set(bad) == expected
    assert "empty file (0 bytes)" in bad[kinds["empty"]]
    assert "truncated" in bad[kinds["truncated"]]
    assert "not an image file" in bad[kinds["not_an_image"]]
    assert "decompression bomb" in bad[kinds["bomb"]]
    assert all(reason.startswith(path) for path, reason in bad.items())
    # In-process and in a pool alike, in the order of the paths.
    assert bad == inspect_images(root, list(cat.images.path), decode=decode, workers=0)
    assert list(bad) == [p for p in cat.images.path if p in bad]


@pytest.mark.parametrize("decode_flag", [[], ["--no-decode"]])
def test_check_decodes_and_names_bad_images(damaged_archive, capsys, decode_flag) -> None:
    root, kinds = damaged_archive
    args = ["check", "--root", str(root), "--split-file", str(root / "2_fold_split.csv"), "--json"]
    assert main([*args, *decode_flag, "--workers", "2"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out["unusable_images"]) == {kinds[k] for k in ("empty", "truncated", "not_an_image", "bomb")}
    problems = "\n".join(out["problems"])
    assert f"{kinds['empty']}: empty file (0 bytes)" in problems
    assert kinds["appended"] not in problems


def test_check_reports_empty_folds_and_every_bad_row(tmp_path, synth_archive, capsys) -> None:
    """A split file with one row in fold 7 (folds 2-6 empty) and a fatal row ('..') among other problems:
    everything is reported, nothing stops the report."""
    root = tmp_path / "archive"
    shutil.copytree(synth_archive, root)
    split = root / "2_fold_split.csv"
    lines = split.read_text().splitlines()
    name, cls, _ = lines[1].split(";")
    lines[1] = f"{name};{cls};7"
    lines[2] = "../../etc/passwd;polyp;0"
    lines.append("a.jpg;no-such-class;1")
    split.write_text("\n".join(lines) + "\n")
    assert main(["check", "--root", str(root), "--split-file", str(split), "--json", "--no-decode"]) == 1
    out = json.loads(capsys.readouterr().out)
    problems = "\n".join(out["problems"])
    for k in range(2, 7):
        assert f"fold {k} holds no image" in problems
    assert "fold 7 (1 images) holds no image of 22 classes" in problems
    assert f"{split}:3: file name '../../etc/passwd' must be a bare file name" in problems
    assert f"{split}:{len(lines)}: unknown class name 'no-such-class'" in problems
    assert "1 labeled images are not in the split file" in problems  # the '..' row's image
    assert len(out["folds"]) == 8
    # Training refuses the same file at once, naming the first bad row and the count of the others.
    with pytest.raises(DataError, match=r":3: file name .* \(and 1 more problems; `ssl-kvasir check`"):
        load_catalog(root, split_file=split)


def test_check_refuses_a_split_whose_images_are_all_in_one_fold(tmp_path, synth_archive, capsys) -> None:
    """Every row naming fold 0: no evaluation fold with a fold to train on. `check` passed it (exit 0) and
    `fit` refused it; now `check` lists it (exit 1)."""
    split = tmp_path / "one_fold.csv"
    rows = (synth_archive / "2_fold_split.csv").read_text().splitlines()
    split.write_text("\n".join([rows[0], *(r.rsplit(";", 1)[0] + ";0" for r in rows[1:])]) + "\n")
    args = ["check", "--root", str(synth_archive), "--split-file", str(split), "--json", "--no-decode"]
    assert main(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["folds"] == {"0": 138}
    assert out["problems"] == [
        "every image of the split is in fold 0: a run needs an evaluation fold and another fold to train on "
        "(a split has at least 2 folds)"
    ]


def test_an_image_linked_from_outside_the_archive_gets_a_note(tmp_path, synth_archive, capsys) -> None:
    """A .jpg that is a symbolic link to a file outside the archive is read from there, with a note in check
    and prepare (it was read and cached without one); a link within the archive gets none."""
    root = tmp_path / "archive"
    shutil.copytree(synth_archive, root)
    images = sorted((root / "unlabeled-images" / "images").iterdir())
    outside = tmp_path / "elsewhere.jpg"
    shutil.move(images[0], outside)
    images[0].symlink_to(outside)
    images[1].unlink()
    images[1].symlink_to(images[2])  # within the archive: no note
    split = root / "2_fold_split.csv"
    assert main(["check", "--root", str(root), "--split-file", str(split), "--json", "--no-decode"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    rel = images[0].relative_to(root).as_posix()
    assert problems == [
        f"1 images are symbolic links to files outside the archive {root}, read from there: {rel} -> {outside}"
    ]
    cache = tmp_path / "cache"
    assert (
        main(["prepare", "--root", str(root), "--cache", str(cache), "--size", "32", "--workers", "0"]) == 0
    )
    assert f"note: 1 images are symbolic links to files outside the archive {root}" in capsys.readouterr().out
