"""The synthetic archive generator: layout, split file, sizes, determinism, and a learnable class signal."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ssl_kvasir.cli import main
from ssl_kvasir.data.archive import load_catalog, read_split_file, scan_folder
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.data.decode import decode_image
from ssl_kvasir.data.synth import SIZES, class_style, make_synthetic_archive, write_image_folder_dataset
from ssl_kvasir.errors import ConfigError

UUID_JPG = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.jpg$")
TINY = ((64, 48), (40, 56))
SYNTH_PER_CLASS, SYNTH_UNLABELED = 6, 60  # what the synth_archive fixture of conftest.py generates


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_is_hyperkvasir(synth_archive):
    for c in HYPERKVASIR_CLASSES:
        folder = synth_archive / "labeled-images" / c.tract / c.category / c.folder
        names = [p.name for p in folder.iterdir()]
        assert len(names) == SYNTH_PER_CLASS
        assert all(UUID_JPG.match(n) for n in names), names
    unlabeled = list((synth_archive / "unlabeled-images" / "images").iterdir())
    assert len(unlabeled) == SYNTH_UNLABELED
    assert all(UUID_JPG.match(p.name) for p in unlabeled)
    files = _all_files(synth_archive)
    assert len(files) == len(HYPERKVASIR_CLASSES) * SYNTH_PER_CLASS + SYNTH_UNLABELED + 1  # + the split file
    assert len({p.name for p in files}) == len(files)  # file names are unique across the archive
    with Image.open(unlabeled[0]) as img:
        assert (img.format, img.mode) == ("JPEG", "RGB")


def test_split_file_reads_back_and_checks_clean(synth_archive, capsys):
    split_path = synth_archive / "2_fold_split.csv"
    assert split_path.read_text().splitlines()[0] == "file-name;class-name;split-index"
    assert ";hemorroids;" in split_path.read_text()  # the split file's own spelling
    split = read_split_file(split_path, HYPERKVASIR_CLASSES)
    assert len(split) == len(HYPERKVASIR_CLASSES) * SYNTH_PER_CLASS
    per_class_fold = split.groupby(["label", "fold"]).size()
    assert set(per_class_fold) == {SYNTH_PER_CLASS // 2}  # stratified: 3 + 3 per class
    catalog = load_catalog(synth_archive, split_file=split_path)
    assert catalog.problems == []
    assert len(catalog.unlabeled) == SYNTH_UNLABELED
    assert main(["check", "--root", str(synth_archive), "--split-file", str(split_path)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_sizes_are_mixed(synth_archive):
    sizes = Counter()
    for path in synth_archive.rglob("*.jpg"):
        with Image.open(path) as img:
            sizes[img.size] += 1
    assert set(sizes) == set(SIZES)
    assert min(sizes.values()) > 0.15 * sum(sizes.values())


def test_same_seed_same_bytes_other_seed_other_archive(tmp_path):
    a = make_synthetic_archive(tmp_path / "a", per_class=1, unlabeled=3, seed=7, sizes=TINY)
    b = make_synthetic_archive(tmp_path / "b", per_class=1, unlabeled=3, seed=7, sizes=TINY)
    c = make_synthetic_archive(tmp_path / "c", per_class=1, unlabeled=3, seed=8, sizes=TINY)
    files_a, files_b = _all_files(a), _all_files(b)
    assert [p.relative_to(a) for p in files_a] == [p.relative_to(b) for p in files_b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(files_a, files_b, strict=True))
    assert {p.name for p in _all_files(c)}.isdisjoint(p.name for p in files_a if p.suffix == ".jpg")


def test_imbalanced_counts_and_more_folds(tmp_path):
    counts = [1 + (i % 5) for i in range(len(HYPERKVASIR_CLASSES))]
    root = make_synthetic_archive(
        tmp_path / "a", per_class=counts, unlabeled=0, seed=1, n_folds=3, sizes=TINY
    )
    split = read_split_file(root / "3_fold_split.csv", HYPERKVASIR_CLASSES)
    assert np.bincount(split.label, minlength=len(counts)).tolist() == counts
    assert set(split.fold) == {0, 1, 2}
    assert list((root / "unlabeled-images" / "images").iterdir()) == []


def test_refuses_a_folder_holding_an_archive(tmp_path):
    make_synthetic_archive(tmp_path / "a", per_class=1, unlabeled=1, seed=0, sizes=TINY)
    with pytest.raises(ConfigError, match="already holds files"):
        make_synthetic_archive(tmp_path / "a", per_class=1, unlabeled=1, seed=1, sizes=TINY)


def test_classes_have_distinct_styles():
    styles = [class_style(i) for i in range(len(HYPERKVASIR_CLASSES))]
    assert len({(s.pattern, s.hue) for s in styles}) == len(styles)


def _features(paths: list[Path], side: int = 32) -> np.ndarray:
    """(N, 14) colour and texture features of ``side`` px thumbnails, blind to where the pattern sits.

    Raw pixels are a poor input for a nearest-mean classifier here because every image shifts its pattern's
    phase; a CNN is translation-invariant, so these stand in for what it sees: the mean and spread of the
    colours inside the field of view, and a histogram of gradient orientations (stripes, checks and rings
    of different orientations differ there).
    """
    rows = []
    for p in paths:
        img = (
            np.asarray(decode_image(p, side, name=str(p)).resize((side, side)), dtype=float) / 255.0
        )  # (s, s, 3)
        grey = img.mean(-1)  # (s, s)
        gy, gx = np.gradient(grey)  # (s, s) each
        inside = grey > 0.15  # the field of view, not the black frame
        angle = np.mod(np.arctan2(gy, gx), np.pi)[inside]
        hist, _ = np.histogram(angle, bins=8, range=(0, np.pi), weights=np.hypot(gx, gy)[inside])
        colours = img[inside]  # (n_inside, 3)
        rows.append(np.concatenate([colours.mean(0), colours.std(0), hist / max(hist.sum(), 1e-9)]))
    x = np.stack(rows)  # (N, 14)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def test_class_signal_nearest_class_mean_beats_chance(synth_archive):
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    lab, unl = catalog.labeled, catalog.unlabeled
    x = _features([synth_archive / p for p in pd.concat([lab.path, unl.path])])  # (198, 14)
    x, xu = x[: len(lab)], x[len(lab) :]
    y, fold = lab.label.to_numpy(), lab.fold.to_numpy()
    accuracies = []
    for k in (0, 1):  # train on one fold (3 images per class), test on the other
        train, test = fold != k, fold == k
        means = np.stack([x[train & (y == c)].mean(0) for c in range(len(HYPERKVASIR_CLASSES))])  # (23, 14)
        dist = ((x[test][:, None, :] - means[None]) ** 2).sum(-1)  # (n_test, 23)
        accuracies.append(float((dist.argmin(1) == y[test]).mean()))
    chance = 1 / len(HYPERKVASIR_CLASSES)
    assert min(accuracies) > 3 * chance and np.mean(accuracies) > 5 * chance, accuracies
    # The unlabeled images come from the same generator, spread over many classes.
    all_means = np.stack([x[y == c].mean(0) for c in range(len(HYPERKVASIR_CLASSES))])  # (23, 14)
    nearest = ((xu[:, None, :] - all_means[None]) ** 2).sum(-1).argmin(1)  # (60,)
    assert len(set(nearest.tolist())) >= 10


def test_some_images_carry_a_green_picture_in_picture(synth_archive):
    with_pip = []
    for path in sorted(synth_archive.rglob("*.jpg")):
        img = np.asarray(decode_image(path, 64, name=str(path)).resize((100, 80)), dtype=int)  # (80, 100, 3)
        corner = img[52:78, 1:28]  # lower-left corner
        green = (corner[..., 1] > 120) & (corner[..., 0] < 90) & (corner[..., 2] < 90)
        with_pip.append(green.sum() >= 8)
    assert 0.1 < np.mean(with_pip) < 0.6


def test_image_folder_dataset_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    labels = np.arange(12) % 3
    unlabeled = np.arange(12) >= 9
    out = write_image_folder_dataset(tmp_path / "digits", images, labels, ["zero", "one", "two"], unlabeled)
    frame, classes, problems = scan_folder(out / "labeled", out / "unlabeled")
    assert problems == [] and classes.names == ["one", "two", "zero"]  # scan_folder sorts class folders
    for row in frame.itertuples():
        i = int(Path(row.filename).stem)
        assert row.label == (-1 if unlabeled[i] else classes.index(["zero", "one", "two"][labels[i]]))
        with Image.open(out / row.path) as img:
            assert np.array_equal(np.asarray(img), images[i])  # PNG is lossless
    catalog = load_catalog(
        out / "labeled", source="folder", generate_folds=2, unlabeled_root=out / "unlabeled"
    )
    assert (len(catalog.labeled), len(catalog.unlabeled)) == (9, 3)


def test_image_folder_dataset_rgb_jpg_and_bad_input(tmp_path):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    out = write_image_folder_dataset(
        tmp_path / "rgb", images, [0, 1], ["a", "b"], [False, True], image_format="jpg"
    )
    assert [p.relative_to(out).as_posix() for p in _all_files(out)] == ["labeled/a/0.jpg", "unlabeled/1.jpg"]
    with pytest.raises(ConfigError, match="uint8"):
        write_image_folder_dataset(tmp_path / "f", images.astype(float), [0, 1], ["a", "b"], [False, False])
    with pytest.raises(ConfigError, match="labels must lie"):
        write_image_folder_dataset(tmp_path / "g", images, [0, 2], ["a", "b"], [False, False])


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "archive"
    assert main(["synth", "--out", str(out), "--per-class", "1", "--unlabeled", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "2_fold_split.csv" in printed
    assert len(read_split_file(out / "2_fold_split.csv", HYPERKVASIR_CLASSES)) == len(HYPERKVASIR_CLASSES)
    assert main(["synth", "--out", str(out), "--per-class", "1", "--unlabeled", "2", "--seed", "3"]) == 2
    assert "already holds files" in capsys.readouterr().err
