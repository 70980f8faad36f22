"""An on-disk embedding store: features and class probabilities of every image, resumable, memory-bounded.

Embedding 110,000 images takes a while; a run that is killed should resume where it stopped, and nothing
downstream (kNN, UMAP, export) should need the whole matrix in memory. The store is a folder::

    features.npy     (N, D) float16 or float32 ``.npy`` file
    probs.npy        (N, C) float32 class probabilities (always float32: they are exported with 3 decimals,
                     and float16's 11-bit mantissa would round some of them the wrong way)
    index.csv        one line per row: path (relative to the archive root), label (-1 = unlabeled), fold
                     (-1 = none), is_labeled
    progress.json    the settings and the finished chunks, rewritten atomically after each chunk
    embeddings.json  the manifest, written by :meth:`EmbeddingWriter.finalize`; its presence marks a
                     finished store

Rows are written in fixed chunks of ``chunk_rows``. A chunk is recorded as finished only after its rows are
flushed to disk, so after a crash every chunk listed in ``progress.json`` is complete and every other chunk is
simply written again.

The store is keyed by the checkpoint's content (``checkpoint_sha256``, a hash of the checkpoint file), never by
its path: a checkpoint overwritten in place is another checkpoint, and its embeddings are computed again.

Rows are written with ordinary I/O (``os.pwrite``), not through a memory map: on a full disk a store written
through a memory map dies by SIGBUS, without a word, while a write fails with ENOSPC and an error that names the
file. Before any row is written the free space is checked against what the rows still to write take, so a store
that cannot fit is refused at once rather than after an hour of embedding.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write, atomic_write_json

FEATURES_FILE = "features.npy"
PROBS_FILE = "probs.npy"
INDEX_FILE = "index.csv"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "embeddings.json"
INDEX_COLUMNS = ["path", "label", "fold", "is_labeled"]
STORE_FORMAT = "ssl_kvasir.embeddings/1"
_FEATURE_DTYPES = ("float16", "float32")


def archive_fingerprint(paths: Iterable[str]) -> str:
    """A hash of the sorted path list: equal for the same set of images in any order."""
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def describe_path_difference(have: Iterable[str], want: Iterable[str], max_shown: int = 3) -> str:
    """One sentence saying how many paths ``want`` adds to and removes from ``have``, with examples."""
    have_set, want_set = set(have), set(want)
    added, removed = sorted(want_set - have_set), sorted(have_set - want_set)
    parts = []
    for verb, names in (("added", added), ("removed", removed)):
        shown = ", ".join(names[:max_shown]) + (" ..." if len(names) > max_shown else "")
        parts.append(f"{len(names)} paths {verb}" + (f" ({shown})" if names else ""))
    return "; ".join(parts)


def _disk_error(path: Path, e: OSError) -> OSError:
    """``e`` as an OSError naming ``path``, with the same errno (the command line maps ENOSPC to exit 1)."""
    return OSError(e.errno, f"cannot write {path}: {e.strerror}")


class _RowFile:
    """A 2-D ``.npy`` file whose rows are written with ``os.pwrite`` at their offsets.

    Args:
        path: the file.
        fd: an open read-write descriptor of it.
        offset: where the data start (the length of the ``.npy`` header).
        dtype: the element type.
        shape: ``(rows, columns)``.
    """

    def __init__(self, path: Path, fd: int, offset: int, dtype: np.dtype, shape: tuple[int, int]):
        self.path, self.fd, self.offset, self.dtype, self.shape = path, fd, offset, dtype, shape
        self.row_bytes = shape[1] * dtype.itemsize

    @classmethod
    def create(cls, path: Path, dtype: str, shape: tuple[int, int]) -> _RowFile:
        """A new file of zeros (sparse: nothing is allocated until rows are written)."""
        dtype_ = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype_), "fortran_order": False, "shape": shape}
        try:
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                offset = f.tell()
                f.truncate(offset + shape[0] * shape[1] * dtype_.itemsize)
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise _disk_error(path, e) from None
        return cls(path, fd, offset, dtype_, shape)

    @classmethod
    def reopen(cls, path: Path, dtype: str, shape: tuple[int, int]) -> _RowFile:
        """An existing file, to resume writing it.

        Raises:
            DataError: when it is not a ``.npy`` file of this dtype and shape.
        """
        try:
            existing = np.load(path, mmap_mode="r")  # read-only: only its header is looked at
            fd = os.open(path, os.O_RDWR)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot reopen to resume ({e}); write to another folder") from None
        if existing.shape != shape or existing.dtype != np.dtype(dtype) or not existing.flags.c_contiguous:
            os.close(fd)
            raise DataError(
                f"{path}: shape {existing.shape} {existing.dtype}, expected {shape} {dtype}; "
                "write to another folder"
            )
        return cls(path, fd, existing.offset, np.dtype(dtype), shape)

    def write(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Write ``block[i]`` to row ``rows[i]``; ``rows`` ascending (runs of consecutive rows are one write).

        Raises:
            OSError: naming the file, when the disk is full or the write fails.
        """
        block = np.ascontiguousarray(block, dtype=self.dtype)  # (B, columns)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # first index of each run of consecutive rows
        for a, b in zip(starts, [*starts[1:], len(rows)], strict=True):
            data = block[a:b].data.cast("B")  # the rows' bytes, without a copy
            position = self.offset + int(rows[a]) * self.row_bytes
            try:
                while data:
                    written = os.pwrite(self.fd, data, position)
                    data, position = data[written:], position + written
            except OSError as e:
                raise _disk_error(self.path, e) from None

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _disk_error(self.path, e) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def _check_space(folder: Path, files: Sequence[_RowFile], rows: int) -> None:
    """Refuse, naming the files, when the disk holding ``folder`` has less room than ``rows`` more rows of
    ``files`` take (the arrays are sparse: a row takes space when it is written).

    Raises:
        OSError: ENOSPC, with what is needed and what is free.
    """
    needed = rows * sum(f.row_bytes for f in files)
    free = shutil.disk_usage(folder).free
    if needed > free:
        names = " and ".join(str(f.path) for f in files)
        raise OSError(
            errno.ENOSPC,
            f"not enough space for {names}: {needed / 2**20:,.1f} MiB needed, {free / 2**20:,.1f} MiB free",
        )


class EmbeddingWriter:
    """Stream features and probabilities into a store folder, chunk by chunk, resuming a killed run.

    Typical use::

        writer = EmbeddingWriter(
            out, n_rows=len(images), dim=512, num_classes=23, checkpoint=str(ckpt), checkpoint_sha256=digest
        )
        writer.write_index(images.path, images.label, images.fold)
        rows = writer.pending_rows()  # only what a previous run did not finish
        for batch in loader_over(rows):  # in the order of ``rows``
            writer.add(features, probs)
        writer.finalize()

    Opening a folder that holds an unfinished run with the same settings continues it; different settings
    (size, dimension, dtype, checkpoint content, chunk size) or a different image list are a DataError, never a
    silent overwrite.

    Args:
        out_dir: the store folder (created).
        n_rows: N, the number of images.
        dim: D, the feature dimension.
        num_classes: C, the number of classes of ``probs``.
        dtype: storage type of the features, float16 (half the disk, enough for cosine kNN) or float32.
        chunk_rows: rows per chunk, the unit of resumption.
        checkpoint: the path of the model checkpoint the embeddings come from (recorded, for the reader).
        checkpoint_sha256: the hash of that checkpoint's bytes (:func:`ssl_kvasir.files.file_sha256`): what
            the store is keyed by; a resumed run must match it.

    Raises:
        ConfigError: for a non-positive size or an unsupported dtype.
        DataError: when ``out_dir`` holds an unfinished run with other settings, or finished embeddings
            without their progress file.
        OSError: ENOSPC naming the files, when the disk has less room than the arrays still need.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        n_rows: int,
        dim: int,
        num_classes: int,
        dtype: np.dtype | type | str = np.float16,
        *,
        chunk_rows: int = 4096,
        checkpoint: str = "",
        checkpoint_sha256: str = "",
    ):
        self.out_dir = Path(out_dir)
        dtype_name = np.dtype(dtype).name
        if dtype_name not in _FEATURE_DTYPES:
            raise ConfigError(
                f"embedding dtype must be one of {', '.join(_FEATURE_DTYPES)}, got {dtype_name}"
            )
        for name, value in (
            ("n_rows", n_rows),
            ("dim", dim),
            ("num_classes", num_classes),
            ("chunk_rows", chunk_rows),
        ):
            if int(value) < 1:
                raise ConfigError(f"EmbeddingWriter: {name} must be at least 1, got {value}")
        self.settings = {
            "n_rows": int(n_rows),
            "dim": int(dim),
            "num_classes": int(num_classes),
            "dtype": dtype_name,
            "chunk_rows": int(chunk_rows),
            "checkpoint_sha256": str(checkpoint_sha256),
        }
        self.checkpoint = str(checkpoint)
        self.n_rows, self.dim, self.num_classes = int(n_rows), int(dim), int(num_classes)
        self.chunk_rows = int(chunk_rows)
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        self._index_written = False
        self._fingerprint = ""
        self._cursor = 0  # position in pending_rows() reached by add()
        self._add_rows: np.ndarray | None = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = self.out_dir / PROGRESS_FILE
        if progress.exists():
            self._done: set[int] = self._resume(progress)
        else:
            if (self.out_dir / MANIFEST_FILE).exists():
                raise DataError(
                    f"{self.out_dir} holds finished embeddings ({MANIFEST_FILE}) but no {PROGRESS_FILE}; "
                    "write to another folder (nothing is deleted implicitly)"
                )
            self._done = set()
            # A run killed before its first progress file left nothing worth keeping: the arrays are recreated.
            self._features = _RowFile.create(
                self.out_dir / FEATURES_FILE, dtype_name, (self.n_rows, self.dim)
            )
            self._probs = _RowFile.create(
                self.out_dir / PROBS_FILE, "float32", (self.n_rows, self.num_classes)
            )
            self._save_progress()
        _check_space(self.out_dir, [self._features, self._probs], self.n_rows - self.done_rows())

    def _resume(self, progress: Path) -> set[int]:
        try:
            saved = json.loads(progress.read_text(encoding="utf-8"))
            saved_settings, done = saved["settings"], saved["done_chunks"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{progress}: unreadable progress file ({e}); write to another folder") from None
        differ = [
            f"{k}: {saved_settings.get(k)!r} there, {v!r} now"
            for k, v in self.settings.items()
            if saved_settings.get(k) != v
        ]
        if differ:
            raise DataError(
                f"{self.out_dir} holds an embedding run with other settings ({'; '.join(differ)}); "
                "write to another folder or remove that one"
            )
        self._features = _RowFile.reopen(
            self.out_dir / FEATURES_FILE, self.settings["dtype"], (self.n_rows, self.dim)
        )
        self._probs = _RowFile.reopen(self.out_dir / PROBS_FILE, "float32", (self.n_rows, self.num_classes))
        return {int(c) for c in done}

    def _save_progress(self) -> None:
        atomic_write_json(
            self.out_dir / PROGRESS_FILE,
            {"settings": self.settings, "done_chunks": sorted(self._done)},
        )

    # -- the image list ------------------------------------------------------------------------------------

    def write_index(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | None = None,
        folds: Sequence[int] | None = None,
        is_labeled: Sequence[bool] | None = None,
    ) -> None:
        """Record which image each row is (once; a resumed run must give the same list in the same order).

        Args:
            paths: N image paths relative to the archive root, in row order.
            labels: class index per row, -1 for unlabeled images (default: all -1).
            folds: fold per row, -1 for none (default: all -1).
            is_labeled: default ``labels >= 0``.

        Raises:
            DataError: when the lengths differ from N, paths repeat, or the folder already holds rows of a
                different image list.
        """
        paths = [str(p) for p in paths]
        if len(paths) != self.n_rows:
            raise DataError(f"{self.out_dir}: {len(paths)} paths for a store of {self.n_rows} rows")
        labels_arr = (
            np.full(self.n_rows, -1, np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        )
        folds_arr = np.full(self.n_rows, -1, np.int64) if folds is None else np.asarray(folds, dtype=np.int64)
        labeled_arr = labels_arr >= 0 if is_labeled is None else np.asarray(is_labeled, dtype=bool)
        for name, arr in (("labels", labels_arr), ("folds", folds_arr), ("is_labeled", labeled_arr)):
            if arr.shape != (self.n_rows,):
                raise DataError(f"{self.out_dir}: {name} has shape {arr.shape}, expected ({self.n_rows},)")
        if len(set(paths)) != len(paths):
            twice = next(p for p, count in Counter(paths).items() if count > 1)
            raise DataError(f"{self.out_dir}: the image list names {twice!r} more than once")
        index = pd.DataFrame(
            {"path": paths, "label": labels_arr, "fold": folds_arr, "is_labeled": labeled_arr}
        )
        index_path = self.out_dir / INDEX_FILE
        if index_path.exists():
            old = _read_index(index_path)
            if not old.equals(index):
                if set(old.path) != set(paths):
                    what = describe_path_difference(old.path, paths)
                elif list(old.path) != paths:
                    what = "the same images in a different order"
                else:
                    what = "the same images with other labels, folds or is_labeled"
                raise DataError(
                    f"{index_path}: this folder holds rows of a different image list ({what}); write to another folder"
                )
        else:
            with atomic_write(index_path, "w", encoding="utf-8", newline="") as f:
                index.to_csv(f, index=False, lineterminator="\n")
        self._fingerprint = archive_fingerprint(paths)
        self._index_written = True
        self._save_progress()

    # -- which rows are left ---------------------------------------------------------------------------------

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``chunk``."""
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"chunk {chunk} outside 0..{self.n_chunks - 1}")
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def pending(self, chunk: int) -> bool:
        """Whether ``chunk`` still has to be written."""
        self.chunk_range(chunk)
        return chunk not in self._done

    def pending_chunks(self) -> list[int]:
        return [c for c in range(self.n_chunks) if c not in self._done]

    def pending_rows(self) -> np.ndarray:
        """Row indices of every unfinished chunk, ascending: the order in which :meth:`add` expects rows."""
        ranges = [np.arange(*self.chunk_range(c)) for c in self.pending_chunks()]
        return np.concatenate(ranges) if ranges else np.empty(0, np.int64)

    def done_rows(self) -> int:
        """How many rows are written and recorded (finished chunks only)."""
        return sum(self.chunk_range(c)[1] - self.chunk_range(c)[0] for c in self._done)

    # -- writing -------------------------------------------------------------------------------------------

    def _check_block(self, features: np.ndarray, probs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._index_written:
            raise ConfigError(
                "EmbeddingWriter: call write_index() before writing rows, so a resumed run can be checked"
            )
        features, probs = np.asarray(features), np.asarray(probs)
        if features.shape != (n, self.dim) or probs.shape != (n, self.num_classes):
            raise DataError(
                f"{self.out_dir}: got features {features.shape} and probs {probs.shape}, "
                f"expected ({n}, {self.dim}) and ({n}, {self.num_classes})"
            )
        with np.errstate(over="ignore"):  # an overflow to inf is reported just below, with a hint
            stored = features.astype(self.settings["dtype"], copy=False)  # (n, D)
        if not np.isfinite(stored).all():
            hint = (
                " (values beyond float16's range: use dtype=float32)" if np.isfinite(features).all() else ""
            )
            raise DataError(f"{self.out_dir}: features contain NaN or infinite values{hint}")
        if not np.isfinite(probs).all():
            raise DataError(f"{self.out_dir}: probabilities contain NaN or infinite values")
        return stored, probs.astype(np.float32, copy=False)

    def _mark_done(self, chunks: Iterable[int]) -> None:
        # Data first, then the record: a chunk listed in progress.json is always complete on disk.
        self._features.sync()
        self._probs.sync()
        self._done.update(chunks)
        self._save_progress()

    def add(self, features: np.ndarray, probs: np.ndarray) -> None:
        """Write the next rows of :meth:`pending_rows` (as of the first call), in any batch size.

        A chunk is recorded as finished as soon as its last row has been added.

        Args:
            features: ``(B, D)`` features of the next B pending rows.
            probs: ``(B, C)`` their class probabilities.
        """
        if self._add_rows is None:
            self._add_rows = self.pending_rows()
        n = len(features)
        if self._cursor + n > len(self._add_rows):
            raise DataError(
                f"{self.out_dir}: {self._cursor + n} rows added, but only {len(self._add_rows)} were pending"
            )
        features, probs = self._check_block(features, probs, n)
        rows = self._add_rows[self._cursor : self._cursor + n]  # (B,) ascending, maybe across chunks
        self._features.write(rows, features)
        self._probs.write(rows, probs)
        self._cursor += n
        # Chunks whose last row lies before the cursor are complete.
        reached = self._add_rows[self._cursor - 1] + 1 if self._cursor else 0
        finished = [c for c in {int(r) // self.chunk_rows for r in rows} if self.chunk_range(c)[1] <= reached]
        if finished:
            self._mark_done(finished)

    def finalize(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the manifest ``embeddings.json`` once every chunk is written.

        Args:
            extra: more facts to record under ``"extra"`` (backbone, image size, ...).

        Returns:
            the manifest's path.

        Raises:
            DataError: when rows are missing.
        """
        if not self._index_written:
            raise ConfigError("EmbeddingWriter: call write_index() before finalize()")
        left = self.n_rows - self.done_rows()
        if left:
            raise DataError(
                f"{self.out_dir}: {left} of {self.n_rows} rows are not written yet; cannot finalize"
            )
        manifest = {
            "format": STORE_FORMAT,
            "n": self.n_rows,
            "dim": self.dim,
            "num_classes": self.num_classes,
            "dtype": self.settings["dtype"],
            "probs_dtype": "float32",
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.settings["checkpoint_sha256"],
            "archive_fingerprint": self._fingerprint,
            "files": {"features": FEATURES_FILE, "probs": PROBS_FILE, "index": INDEX_FILE},
            "extra": dict(extra or {}),
        }
        path = self.out_dir / MANIFEST_FILE
        atomic_write_json(path, manifest)
        self._features.close()
        self._probs.close()
        return path


def store_checkpoint(store_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint_sha256`` a store (finished or not) was computed from: ``""`` for a store that records
    none (written before stores were keyed by content), None when ``store_dir`` holds no store.

    Raises:
        DataError: for a manifest or progress file that cannot be read.
    """
    for name, key in ((MANIFEST_FILE, None), (PROGRESS_FILE, "settings")):
        path = Path(store_dir) / name
        if not path.exists():
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return str((saved[key] if key else saved).get("checkpoint_sha256", ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: unreadable ({e}); write to another folder") from None
    return None


def remove_store(store_dir: str | os.PathLike) -> None:
    """Delete the files of an embedding store (only those; the folder and anything else in it stay).

    The manifest goes first and the progress file last, so a store interrupted on the way is an unfinished
    store of the old checkpoint, which is removed again, never a finished store with missing files.
    """
    for name in (MANIFEST_FILE, INDEX_FILE, FEATURES_FILE, PROBS_FILE, PROGRESS_FILE):
        (Path(store_dir) / name).unlink(missing_ok=True)


def _read_index(path: Path) -> pd.DataFrame:
    """Read ``index.csv``; paths stay strings (no NA guessing: a file may be called ``NA.jpg``)."""
    try:
        frame = pd.read_csv(path, dtype={"path": str}, keep_default_na=False, na_filter=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the index ({e})") from None
    if list(frame.columns) != INDEX_COLUMNS:
        raise DataError(f"{path}: columns are {list(frame.columns)}, expected {INDEX_COLUMNS}")
    # read_csv parses a column of only True/False as bool; anything else in it is damage.
    if frame.is_labeled.dtype != bool:
        raise DataError(f"{path}: column is_labeled must hold only True or False")
    try:
        return frame.astype({"path": str, "label": np.int64, "fold": np.int64})
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: bad value in the index ({e})") from None


@dataclass
class Embeddings:
    """A finished store, opened read-only.

    Attributes:
        features: ``(N, D)`` memmap (float16 or float32); read it in chunks.
        probs: ``(N, C)`` float32 memmap of class probabilities.
        paths: ``(N,)`` image paths relative to the archive root.
        labels: ``(N,)`` int64 class index, -1 = unlabeled.
        folds: ``(N,)`` int64 fold, -1 = none.
        is_labeled: ``(N,)`` bool.
        meta: the manifest (``embeddings.json``).
    """

    features: np.ndarray
    probs: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    is_labeled: np.ndarray
    meta: dict
    _rows: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def row_of(self, path: str) -> int:
        """The row of an image path.

        Raises:
            DataError: when the store has no such path.
        """
        if self._rows is None:
            self._rows = {p: i for i, p in enumerate(self.paths)}
        try:
            return self._rows[path]
        except KeyError:
            raise DataError(f"no embedding for {path!r} in this store ({len(self)} images)") from None


def load_embeddings(store_dir: str | os.PathLike, expected_paths: Iterable[str] | None = None) -> Embeddings:
    """Open a finished store without reading the arrays into memory.

    Args:
        store_dir: the folder an :class:`EmbeddingWriter` finalized.
        expected_paths: the images the caller expects (the current archive); order does not matter.

    Raises:
        DataError: for an unfinished or damaged store, or when ``expected_paths`` is not the store's image
            set (the archive changed), saying how many paths were added and removed.
    """
    store_dir = Path(store_dir)
    manifest_path = store_dir / MANIFEST_FILE
    if not manifest_path.exists():
        progress = store_dir / PROGRESS_FILE
        if progress.exists():
            saved = json.loads(progress.read_text(encoding="utf-8"))
            chunk_rows, n = saved["settings"]["chunk_rows"], saved["settings"]["n_rows"]
            done = sum(min(chunk_rows, n - c * chunk_rows) for c in saved["done_chunks"])
            raise DataError(
                f"{store_dir}: unfinished embeddings ({done} of {n} rows); run the embedding again to resume"
            )
        raise DataError(f"{store_dir}: not an embedding store (no {MANIFEST_FILE})")
    try:
        meta = json.loads(manifest_path.read_text(encoding="utf-8"))
        n, dim, num_classes, dtype = meta["n"], meta["dim"], meta["num_classes"], meta["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path}: unreadable manifest ({e})") from None
    arrays = {}
    for name, shape, want_dtype in (
        (FEATURES_FILE, (n, dim), dtype),
        (PROBS_FILE, (n, num_classes), "float32"),
    ):
        path = store_dir / name
        try:
            arrays[name] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot open ({e})") from None
        if arrays[name].shape != shape or arrays[name].dtype != np.dtype(want_dtype):
            raise DataError(
                f"{path}: shape {arrays[name].shape} {arrays[name].dtype}, manifest says {shape} {want_dtype}"
            )
    index = _read_index(store_dir / INDEX_FILE)
    if len(index) != n:
        raise DataError(f"{store_dir / INDEX_FILE}: {len(index)} rows, manifest says {n}")
    paths = index.path.to_numpy(dtype=object)
    if archive_fingerprint(paths) != meta.get("archive_fingerprint"):
        raise DataError(f"{store_dir / INDEX_FILE}: the image list does not match the manifest's fingerprint")
    if expected_paths is not None:
        expected = [str(p) for p in expected_paths]
        if archive_fingerprint(expected) != meta["archive_fingerprint"]:
            if set(expected) == set(paths):
                raise DataError(f"{store_dir}: the expected image list names some paths more than once")
            raise DataError(
                f"{store_dir}: the embeddings were computed for another image list "
                f"({describe_path_difference(paths, expected)} in the archive since); embed again"
            )
    return Embeddings(
        features=arrays[FEATURES_FILE],
        probs=arrays[PROBS_FILE],
        paths=paths,
        labels=index.label.to_numpy(),
        folds=index.fold.to_numpy(),
        is_labeled=index.is_labeled.to_numpy(),
        meta=meta,
    )
