"""Reading an image archive: the HyperKvasir layout, a generic image-folder layout, and split files.

Both sources produce one :class:`Catalog`: a table of every image with its path relative to the archive
root, its class index (-1 when unlabeled) and its fold (-1 when unlabeled or not in the split), plus the
list of problems found on the way. Nothing is silently dropped: whatever does not fit is listed in
``Catalog.problems`` so that ``ssl-kvasir check`` can report it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LABELED_DIR = "labeled-images"
UNLABELED_DIR = "unlabeled-images/images"
SPLIT_HEADER = ("file-name", "class-name", "split-index")


@dataclass
class Catalog:
    """Every image of an archive.

    Attributes:
        root: the archive root; ``images.path`` is relative to it.
        classes: the class table; ``images.label`` indexes it.
        images: one row per image with columns ``filename``, ``path``, ``label`` (-1 = unlabeled) and
            ``fold`` (-1 = unlabeled, or labeled but absent from the split). Labeled rows come first.
        n_folds: number of folds in the split.
        problems: everything that did not fit, one readable sentence each.
    """

    root: Path
    classes: ClassTable
    images: pd.DataFrame
    n_folds: int
    problems: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> pd.DataFrame:
        return self.images[self.images.label >= 0]

    @property
    def unlabeled(self) -> pd.DataFrame:
        return self.images[self.images.label < 0]

    def summary(self) -> dict:
        """Counts per class and per fold, as ``ssl-kvasir check --json`` prints them."""
        lab = self.labeled
        in_split = lab[lab.fold >= 0]
        per_class = np.bincount(in_split.label, minlength=len(self.classes))
        per_fold = np.bincount(in_split.fold, minlength=self.n_folds)
        return {
            "root": str(self.root),
            "labeled": int(len(in_split)),
            "unlabeled": int(len(self.unlabeled)),
            "classes": {c.folder: int(n) for c, n in zip(self.classes, per_class, strict=True)},
            "folds": {str(k): int(n) for k, n in enumerate(per_fold)},
            "problems": list(self.problems),
        }


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def links_outside(root: Path, paths: list[str], max_shown: int = 3) -> str | None:
    """A note on the images of ``paths`` (relative to ``root``) that are symbolic links to files outside
    ``root``, or None when there are none. They are read like any image (an archive assembled from links is
    legitimate), but what a run reads should be visibly the archive's."""
    base = Path(root).resolve()
    outside = []
    for p in paths:
        path = Path(root) / p
        if path.is_symlink() and not path.resolve().is_relative_to(base):
            outside.append(f"{p} -> {path.resolve()}")
    if not outside:
        return None
    shown = ", ".join(outside[:max_shown]) + (" ..." if len(outside) > max_shown else "")
    return f"{len(outside)} images are symbolic links to files outside the archive {root}, read from there: {shown}"


def scan_hyperkvasir(root: Path, classes: ClassTable = HYPERKVASIR_CLASSES) -> tuple[pd.DataFrame, list[str]]:
    """Find every image of a HyperKvasir archive.

    Labeled images are ``labeled-images/<tract>/<category>/<class-folder>/<name>.jpg`` (the class comes from
    the folder; either spelling is accepted), unlabeled ones ``unlabeled-images/images/<name>.jpg``.

    Returns:
        a frame with ``filename, path, label`` (label -1 = unlabeled) and the problems found.

    Raises:
        DataError: when ``root`` has no ``labeled-images`` folder.
    """
    root = Path(root)
    labeled_root = root / LABELED_DIR
    if not labeled_root.is_dir():
        raise DataError(
            f"{root} is not a HyperKvasir archive: there is no {LABELED_DIR}/ folder in it "
            f"(expected {LABELED_DIR}/<tract>/<category>/<class>/<image>.jpg and {UNLABELED_DIR}/<image>.jpg; "
            "for another layout use data.source=folder)"
        )
    rows, problems = [], []
    for dirpath, dirnames, filenames in os.walk(labeled_root):
        dirnames.sort()
        images = sorted(f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        if not images:
            continue
        folder = Path(dirpath)
        rel_dir = folder.relative_to(root).as_posix()
        if folder.name not in classes:
            problems.append(f"unknown class folder {rel_dir} ({len(images)} images skipped)")
            continue
        label = classes.index(folder.name)
        rows += [(name, f"{rel_dir}/{name}", label) for name in images]
    unlabeled_dir = root / UNLABELED_DIR
    if unlabeled_dir.is_dir():
        rows += [(p.name, f"{UNLABELED_DIR}/{p.name}", -1) for p in _list_images(unlabeled_dir)]
    if not unlabeled_dir.is_dir() or not any(r[2] < 0 for r in rows):
        problems.append(f"no unlabeled images in {unlabeled_dir}")
    if (note := links_outside(root, [r[1] for r in rows])) is not None:
        problems.append(note)
    return pd.DataFrame(rows, columns=["filename", "path", "label"]), problems


def scan_folder(root: Path, unlabeled_root: Path | None = None) -> tuple[pd.DataFrame, ClassTable, list[str]]:
    """Find every image of a generic image-folder data set: ``root/<class>/<image>`` labeled, images directly
    in ``unlabeled_root`` unlabeled. Classes are the sub-folders of ``root`` in sorted order.

    Paths are relative to the common folder of ``root`` and ``unlabeled_root``, which becomes the catalog's
    root, so that every path stays inside the data the user pointed at.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    classes = ClassTable.from_names(p.name for p in class_dirs)
    base = Path(os.path.commonpath([root, unlabeled_root])) if unlabeled_root else root
    rows, problems = [], []
    for label, d in enumerate(class_dirs):
        images = _list_images(d)
        if not images:
            problems.append(f"class folder {d} holds no images")
        rows += [(p.name, p.relative_to(base).as_posix(), label) for p in images]
    if unlabeled_root is not None:
        unlabeled_root = Path(unlabeled_root)
        if not unlabeled_root.is_dir():
            raise DataError(f"data.unlabeled_root {unlabeled_root} is not a folder")
        unlabeled = _list_images(unlabeled_root)
        if not unlabeled:
            problems.append(f"no unlabeled images in {unlabeled_root}")
        rows += [(p.name, p.relative_to(base).as_posix(), -1) for p in unlabeled]
    if (note := links_outside(base, [r[1] for r in rows])) is not None:
        problems.append(note)
    return pd.DataFrame(rows, columns=["filename", "path", "label"]), classes, problems


def read_split_file(path: Path, classes: ClassTable, problems: list[str] | None = None) -> pd.DataFrame:
    """Read an official split file: ``file-name;class-name;split-index``, any number of folds.

    Class names may use either spelling. File names must be bare (no folder, no ``..``). Every row is read
    before anything is refused, so that all bad rows are known at once.

    Args:
        path: the split file.
        classes: the class table that names must be in.
        problems: where bad rows go, one sentence each, when the caller reports rather than refuses
            (``ssl-kvasir check``): bad rows are then left out, and a file that cannot be read at all (missing,
            wrong header) yields an empty frame. None: the first bad row is raised.

    Returns:
        a frame with ``filename``, ``label`` and ``fold``.

    Raises:
        DataError: naming the file and line, for a wrong delimiter or header, an unknown class, a bad fold
            index, a file name with a path in it, or a file name listed twice (only when ``problems`` is None).
    """
    path = Path(path)
    found: list[str] = []
    rows: list[tuple[str, int, int]] = []
    if not path.is_file():
        found.append(f"split file {path} does not exist")
    else:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=";")
            header = tuple(h.strip() for h in next(reader, ()))
            if header != SPLIT_HEADER:
                found.append(
                    f"{path}: header is {';'.join(header) or '(empty)'!r}; a split file is ';'-delimited with the "
                    f"header {';'.join(SPLIT_HEADER)!r}"
                )
            else:
                rows = _split_rows(path, reader, classes, found)
            if not rows and not found:
                found.append(f"{path}: the split file lists no images")
    if found and problems is None:
        more = (
            f" (and {len(found) - 1} more problems; `ssl-kvasir check` lists them all)"
            if len(found) > 1
            else ""
        )
        raise DataError(found[0] + more)
    if problems is not None:
        problems += found
    return pd.DataFrame(rows, columns=["filename", "label", "fold"])


def _split_rows(path: Path, reader, classes: ClassTable, found: list[str]) -> list[tuple[str, int, int]]:
    """The good rows of a split file after its header; each bad row is one sentence in ``found``."""
    rows: list[tuple[str, int, int]] = []
    seen: dict[str, int] = {}  # file name -> the line it was first listed on
    for lineno, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != 3:
            found.append(f"{path}:{lineno}: expected 3 ';'-separated fields, got {len(fields)}: {fields!r}")
            continue
        name, cls, fold = (x.strip() for x in fields)
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".."):
            found.append(
                f"{path}:{lineno}: file name {name!r} must be a bare file name (no folders, no '..')"
            )
            continue
        if name in seen:
            found.append(f"{path}:{lineno}: file name {name!r} is listed twice (first on line {seen[name]})")
            continue
        seen[name] = lineno
        try:
            label = classes.index(cls)
        except KeyError as e:
            found.append(f"{path}:{lineno}: {e.args[0]}")
            continue
        if not fold.isdigit():
            found.append(f"{path}:{lineno}: split-index {fold!r} is not a non-negative integer")
            continue
        rows.append((name, label, int(fold)))
    return rows


def write_split_file(path: Path, filenames, labels, folds, classes: ClassTable) -> None:
    """Write a split file in the official format (split-file spellings of the class names)."""
    from ssl_kvasir.files import atomic_write_text

    lines = [";".join(SPLIT_HEADER)]
    lines += [
        f"{n};{classes[int(y)].split_name};{int(k)}" for n, y, k in zip(filenames, labels, folds, strict=True)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Seeded stratified fold assignment: each class is shuffled and dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        # The round-robin start rotates between classes so small classes do not all favour fold 0.
        folds[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return folds


def join_split(
    images: pd.DataFrame, split: pd.DataFrame, split_path: Path, classes: ClassTable
) -> tuple[pd.DataFrame, list[str]]:
    """Attach folds from a split file to scanned images, joining by file name; report what does not fit."""
    problems = []
    lab = images[images.label >= 0]
    dup = lab.filename[lab.filename.duplicated(keep=False)]
    for name in sorted(set(dup)):
        where = ", ".join(lab.path[lab.filename == name])
        problems.append(f"duplicate file name {name} in several class folders ({where}); all copies left out")
    fold_of = dict(zip(split.filename, split.fold, strict=True))
    label_of = dict(zip(split.filename, split.label, strict=True))
    dup_names = set(dup)
    folds = np.array(
        [
            -1 if (y < 0 or n in dup_names) else fold_of.get(n, -1)
            for n, y in zip(images.filename, images.label, strict=True)
        ]
    )
    images = images.assign(fold=folds)
    missing = lab.filename[~lab.filename.isin(fold_of.keys())]
    if len(missing):
        shown = ", ".join(missing.iloc[:5])
        problems.append(
            f"{len(missing)} labeled images are not in the split file {split_path} and are left out: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    have = set(lab.filename)
    orphans = split.filename[~split.filename.isin(have)]
    if len(orphans):
        shown = ", ".join(orphans.iloc[:5])
        problems.append(
            f"{len(orphans)} entries of {split_path} have no image in the archive: {shown}"
            + (" ..." if len(orphans) > 5 else "")
        )
    in_split = images[(images.fold >= 0)]
    disagree = in_split[in_split.label.to_numpy() != in_split.filename.map(label_of).to_numpy()]
    for _, r in disagree.iterrows():
        problems.append(
            f"{r.path}: folder says {classes[r.label].folder}, {split_path} says "
            f"{classes[label_of[r.filename]].folder}; the image is left out"
        )
    if len(disagree):
        images.loc[disagree.index, "fold"] = -1
    return images, problems


def load_catalog(
    root: Path,
    source: str = "hyperkvasir",
    split_file: Path | None = None,
    generate_folds: int | None = None,
    fold_seed: int = 0,
    unlabeled_root: Path | None = None,
    strict: bool = True,
) -> Catalog:
    """Scan an archive and attach its folds.

    Args:
        root: archive root (``hyperkvasir``) or labeled class-folder root (``folder``).
        source: ``hyperkvasir`` or ``folder``.
        split_file: a split file in the official format. Required unless ``generate_folds`` is set.
        generate_folds: generate this many seeded stratified folds instead of reading a split file. This must
            be asked for: without a split file and without it, loading fails.
        fold_seed: seed of the generated folds.
        unlabeled_root: the unlabeled image folder of a ``folder`` source.
        strict: refuse a split file with bad rows (training); False lists them among the problems and leaves
            those rows out (``ssl-kvasir check``, which reports everything it finds).

    Besides the scan's and the split's problems, the catalog lists folds that hold no image and folds that
    lack some class (:func:`fold_problems`).
    """
    root = Path(root)
    if source == "hyperkvasir":
        classes = HYPERKVASIR_CLASSES
        images, problems = scan_hyperkvasir(root, classes)
    elif source == "folder":
        images, classes, problems = scan_folder(root, unlabeled_root)
        if unlabeled_root is not None:
            root = Path(os.path.commonpath([root, unlabeled_root]))
    else:
        raise DataError(f"unknown data source {source!r}; valid sources: hyperkvasir, folder")
    if split_file is not None and generate_folds:
        raise DataError("give either a split file (data.split_file) or data.generate_folds, not both")
    if split_file is not None:
        split = read_split_file(Path(split_file), classes, problems=None if strict else problems)
        images, join_problems = join_split(images, split, Path(split_file), classes)
        problems += join_problems
        n_folds = int(split.fold.max()) + 1 if len(split) else 0
    elif generate_folds:
        if generate_folds < 2:
            raise DataError(f"data.generate_folds must be at least 2, got {generate_folds}")
        labeled = images.label.to_numpy() >= 0
        folds = np.full(len(images), -1)
        folds[labeled] = stratified_folds(images.label.to_numpy()[labeled], generate_folds, fold_seed)
        images = images.assign(fold=folds)
        n_folds = generate_folds
    else:
        raise DataError(
            f"no split file for {root}: pass data.split_file=FILE (the official 2_fold_split.csv for HyperKvasir), "
            "or ask for seeded stratified folds explicitly with data.generate_folds=N"
        )
    images = images.sort_values("label", key=lambda s: s < 0, kind="stable").reset_index(drop=True)
    problems += fold_problems(images, classes, n_folds)
    return Catalog(root=root, classes=classes, images=images, n_folds=n_folds, problems=problems)


def list_images(
    root: Path,
    source: str = "hyperkvasir",
    split_file: Path | None = None,
    generate_folds: int | None = None,
    unlabeled_root: Path | None = None,
) -> tuple[Path, pd.DataFrame, list[str]]:
    """Every image of an archive, for work that needs no folds (``ssl-kvasir prepare`` caches them all).

    With a split (``split_file`` or ``generate_folds``) the images are the catalog's (:func:`load_catalog`);
    without one, every image the source's scan finds.

    Returns:
        the folder the paths are relative to, the images (``filename, path, label``; label -1 = unlabeled)
        and the problems found.
    """
    if split_file is not None or generate_folds:
        catalog = load_catalog(
            root,
            source=source,
            split_file=split_file,
            generate_folds=generate_folds,
            unlabeled_root=unlabeled_root,
        )
        return catalog.root, catalog.images, catalog.problems
    if source == "hyperkvasir":
        images, problems = scan_hyperkvasir(root)
        return Path(root), images, problems
    images, _, problems = scan_folder(root, unlabeled_root)
    # scan_folder's paths are relative to the common folder of the labeled and unlabeled images.
    base = Path(os.path.commonpath([root, unlabeled_root])) if unlabeled_root else Path(root)
    return base, images, problems


def fold_problems(images: pd.DataFrame, classes: ClassTable, n_folds: int) -> list[str]:
    """Folds that hold no image, folds that lack classes (as an evaluation fold such a fold cannot measure
    those classes; as a training fold of a 2-fold split it cannot teach them), and a split whose images are all
    in one fold (no pair of an evaluation fold and a fold to train on: ``fit`` refuses it).

    A split file's folds are numbered 0..max, so a file whose only rows are in fold 7 has seven empty folds.
    """
    lab = images[(images.label >= 0) & (images.fold >= 0)]
    present = [c for c in range(len(classes)) if (lab.label == c).any()]  # classes that have images at all
    problems = []
    used = sorted(set(lab.fold))
    if len(used) == 1:
        problems.append(
            f"every image of the split is in fold {used[0]}: a run needs an evaluation fold and another fold "
            "to train on (a split has at least 2 folds)"
        )
    for k in range(n_folds):
        labels = lab.label[lab.fold == k]
        if labels.empty:
            problems.append(f"fold {k} holds no image: it cannot be an evaluation fold (data.fold={k})")
            continue
        lacking = [classes[c].folder for c in present if not (labels == c).any()]
        if lacking:
            problems.append(
                f"fold {k} ({len(labels)} images) holds no image of {len(lacking)} classes: {', '.join(lacking)}"
            )
    return problems


# The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk (with its CRC).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL_BYTES = 4096


def inspect_image(path: Path, decode: bool, name: str) -> str | None:
    """Why the image file ``path`` cannot be used, or None when it can.

    Without ``decode`` the check is structural and cheap: the file is not empty, PIL recognises its header,
    its pixel count is below PIL's decompression-bomb limit, and a JPEG or PNG ends with its end marker (a
    download cut short does not); only a file without its end marker is decoded, to tell a truncated file
    from one with bytes appended after the marker. With ``decode`` every file is decoded as ``prepare``
    decodes it, which also finds damage inside complete files.

    Args:
        path: the file.
        decode: decode the whole image.
        name: how to name the file in the reason.
    """
    from PIL import Image

    from ssl_kvasir.data.decode import decode_image

    try:
        n_bytes = path.stat().st_size
    except OSError as e:
        return f"{name}: cannot read: {e.strerror}"
    if n_bytes == 0:
        return f"{name}: empty file (0 bytes)"
    must_decode = decode
    if not decode:
        try:
            with Image.open(path) as img:
                marker = _END_MARKERS.get(img.format or "")
        except Image.DecompressionBombError as e:
            return f"{name}: oversized image: {e}"
        except Image.UnidentifiedImageError:
            return f"{name}: not an image file PIL can read"
        except (OSError, SyntaxError, ValueError) as e:
            return f"{name}: cannot read the image header: {e}"
        if marker is not None:
            with path.open("rb") as f:
                f.seek(max(n_bytes - _TAIL_BYTES, 0))
                must_decode = marker not in f.read()
    if must_decode:
        try:
            # A small draft size: libjpeg still reads every byte of the compressed data, at a fraction of
            # the cost of a full-size decode.
            decode_image(path, 64, name=name)
        except DataError as e:
            return str(e)
    return None


def _inspect_chunk(root: str, paths: list[str], decode: bool) -> list[tuple[str, str]]:
    """(path, reason) of every unusable image of ``paths`` below ``root`` (runs in a worker process)."""
    found = []
    for p in paths:
        reason = inspect_image(Path(root) / p, decode, name=p)
        if reason is not None:
            found.append((p, reason))
    return found


def inspect_images(
    root: Path,
    paths: list[str],
    decode: bool = True,
    workers: int | None = os.cpu_count(),
    progress: bool = False,
    chunk: int = 64,
) -> dict[str, str]:
    """Every unusable image of ``paths`` (relative to ``root``) with the reason, checked by
    :func:`inspect_image` in a pool of worker processes.

    Args:
        root: the archive root.
        paths: image paths relative to ``root``.
        decode: decode every image (else the structural check).
        workers: worker processes; 0 or 1 checks in this process.
        progress: report progress (:class:`ssl_kvasir.console.Progress`: a bar on a terminal, log lines
            otherwise).
        chunk: images per task.

    Returns:
        ``{path: reason}`` in the order of ``paths``.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ssl_kvasir.console import Progress
    from ssl_kvasir.data.cache import pool_context

    paths = list(paths)
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    found: dict[str, str] = {}
    what = "decoding" if decode else "checking"
    if not workers or workers <= 1 or len(chunks) <= 1:
        with Progress(what, len(paths), enabled=progress) as bar:
            for c in chunks:
                found.update(_inspect_chunk(str(root), c, decode))
                bar.advance(len(c))
    else:
        # The pool starts before the progress bar's refresh thread (forking with threads running is unsafe).
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=pool_context()) as pool:
            size_of = {pool.submit(_inspect_chunk, str(root), c, decode): len(c) for c in chunks}
            with Progress(what, len(paths), enabled=progress) as bar:
                for future in as_completed(size_of):
                    found.update(future.result())
                    bar.advance(size_of[future])
    order = {p: i for i, p in enumerate(paths)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))
