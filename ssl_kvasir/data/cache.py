"""The prepared cache: every image of an archive shrunk once, re-encoded as JPEG and packed into shard files.

Why this design (measured on a 2-core VM): the 110k HyperKvasir images as a uint8 array at 256 px take
20 GiB, which falls out of the page cache, so training would read from disk; re-encoded as 256 px JPEGs
they take about 1.5 GiB, stay in the page cache, and decode at 3-4k images/s per core. Decoding the
originals instead costs 3-8 ms each. So each image is stored with its shorter side shrunk to ``size``
(aspect ratio kept), as JPEG bytes (quality 90) appended to a shard file, and read back with one
``os.pread``.

Layout of a cache folder::

    manifest.json            format version, size, quality, archive root, the shard plan (files per
                             shard), per-path location [shard, offset, length], skipped files with
                             reasons, counts; "complete" is false while a build is running
    shard-00000.bin          the JPEG bytes of up to shard_size images, back to back
    shard-00000.idx.json     that shard's record: its planned files, offsets and lengths, skipped files

Building is resumable: the plan is written first, each shard's ``.bin`` and then its record are written
atomically when the shard is finished, and a rerun rebuilds only shards without a valid record.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssl_kvasir.console import Progress
from ssl_kvasir.data.decode import decode_image
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import LOCK_FILE, atomic_write, atomic_write_json, hold_lock, lock_holder

CACHE_FORMAT = "ssl_kvasir image cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class CacheReport:
    """What one :func:`prepare_cache` run did.

    Attributes:
        cache_dir: the cache folder.
        size: the cached shorter side in pixels.
        n_requested: distinct paths asked for.
        n_cached: of them, the ones now in the cache.
        n_new: images encoded by this run (the rest came from shards finished earlier).
        skipped: asked-for paths that could not be cached, with the reason.
        shards_built: shards written by this run.
        shards_reused: shards found finished and left untouched.
        elapsed_s: wall time of the run.
    """

    cache_dir: Path
    size: int
    n_requested: int
    n_cached: int
    n_new: int
    skipped: dict[str, str] = field(default_factory=dict)
    shards_built: int = 0
    shards_reused: int = 0
    elapsed_s: float = 0.0


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shrink(img: Image.Image, size: int) -> Image.Image:
    """Reduce by the largest integer factor that keeps the shorter side at least ``size``; never enlarge.

    The cached shorter side therefore lies in ``[size, 2 * size)``. A JPEG arrives here already in that range
    from DCT-scaled decoding (scales 1/2, 1/4, 1/8), so it is stored as decoded, with no resampling at all:
    training resizes to its input size anyway, and one resampling fewer is both faster and sharper. Other
    formats get the same integer reduction with a box filter (``Image.reduce``).
    """
    factor = min(img.size) // size
    return img.reduce(factor) if factor >= 2 else img


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _build_shard(root: str, cache_dir: str, index: int, files: list[str], size: int, quality: int) -> dict:
    """Encode one shard (runs in a worker process): write its ``.bin``, then its record; return the record.

    A file that cannot be decoded is listed in the record's ``skipped`` with the reason; it never stops the
    shard.
    """
    name = _shard_name(index)
    paths, offsets, lengths, skipped = [], [], [], {}
    offset = 0
    with atomic_write(Path(cache_dir) / f"{name}.bin", "wb") as f:
        for path in files:
            try:
                img = decode_image(Path(root) / path, size, name=path)
                data = _encode(shrink(img, size), quality)
            except DataError as e:
                skipped[path] = str(e).removeprefix(f"{path}: ")
                continue
            except (OSError, ValueError, MemoryError) as e:
                skipped[path] = f"cannot re-encode: {type(e).__name__}: {e}"
                continue
            f.write(data)
            paths.append(path)
            offsets.append(offset)
            lengths.append(len(data))
            offset += len(data)
    record = {
        "files": list(files),
        "size": size,
        "quality": quality,
        "bytes": offset,
        "paths": paths,
        "offsets": offsets,
        "lengths": lengths,
        "skipped": skipped,
    }
    # The record is written last: it marks the shard finished only once its data are on disk.
    atomic_write_json(Path(cache_dir) / f"{name}.idx.json", record)
    return record


def _read_record(cache_dir: Path, index: int, files: list[str], size: int, quality: int) -> dict | None:
    """The record of a finished shard, or None when the shard must be (re)built."""
    name = _shard_name(index)
    try:
        record = json.loads((cache_dir / f"{name}.idx.json").read_text(encoding="utf-8"))
        n_bytes = (cache_dir / f"{name}.bin").stat().st_size
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(record, dict)
        and record.get("files") == files
        and record.get("size") == size
        and record.get("quality") == quality
        and record.get("bytes") == n_bytes
    )
    return record if ok else None


def _read_manifest(cache_dir: Path) -> dict | None:
    """The parsed manifest of ``cache_dir``, None when there is none; DataError when it is not a cache's."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the cache manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{path} is not an ssl_kvasir image cache manifest")
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(
            f"{path}: cache format version {manifest.get('version')}, this code reads version {CACHE_VERSION}; "
            "rebuild the cache with ssl-kvasir prepare into a new folder"
        )
    return manifest


def pool_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of the cache's worker pools: fork where the platform has it.

    Forked workers start at once, with this module already imported, and need no ``if __name__ ==
    "__main__"`` guard in the caller's script (a spawned or fork-server worker re-runs the caller's main
    module). Forking is unsafe only while other threads hold locks, so the pool is started before the
    progress bar starts its refresh thread. Elsewhere (Windows, macOS) workers are spawned.
    """
    if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _holding_the_cache_lock(build):
    """Run ``build`` holding the cache folder's lock: a second prepare of the same cache is refused (a stale
    lock, left by a killed prepare, is taken over). Within the lock, files of ``atomic_write`` that a killed
    run left behind (``.shard-*.tmp``) are nobody's and are removed when the build succeeds."""
    import functools
    import inspect

    signature = inspect.signature(build)

    @functools.wraps(build)
    def locked(*args, **kwargs):
        cache_dir = Path(signature.bind(*args, **kwargs).arguments["cache_dir"])
        with hold_lock(cache_dir, f"ssl-kvasir prepare of {cache_dir}"):
            report = build(*args, **kwargs)
            for tmp in [*cache_dir.glob(".shard-*.tmp"), *cache_dir.glob(f".{MANIFEST}.*.tmp")]:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            return report

    return locked


@_holding_the_cache_lock
def prepare_cache(
    root: Path,
    paths: Sequence[str],
    cache_dir: Path,
    size: int,
    workers: int | None = os.cpu_count(),
    shard_size: int = 1024,
    progress: bool = True,
    quality: int = 90,
) -> CacheReport:
    """Build or extend the prepared cache of the images ``paths`` below ``root``.

    Each image is decoded (JPEG DCT scaling does most of the shrinking), resized so that its shorter side
    is ``size`` (smaller images are kept at their size), re-encoded as JPEG and appended to a shard of
    ``shard_size`` images. Shards are built in parallel, one per task. A rerun (after a kill, or with more
    paths because the archive grew) keeps every finished shard and builds only the unfinished and new ones.
    A file that cannot be decoded is skipped and reported with the reason.

    Args:
        root: the archive root; ``paths`` are relative to it.
        paths: image paths relative to ``root`` (duplicates are cached once).
        cache_dir: the cache folder (created when missing; otherwise it must hold a cache or be empty).
        size: the shorter side of the cached images, in pixels.
        workers: worker processes; 0 or 1 builds in this process.
        shard_size: images per shard file.
        progress: report progress (:class:`ssl_kvasir.console.Progress`: a bar with rate and time left on a
            terminal, a log line every 30 s or 10 % otherwise).
        quality: JPEG quality of the cached images.

    Returns:
        the counts of the run.

    Raises:
        DataError: when ``cache_dir`` holds a cache of another size, quality or archive root, or is a
            non-empty folder that is no cache; when a path is absolute or climbs out of ``root``.
        FolderLocked: when another prepare is building the same cache.
    """
    start = time.perf_counter()
    root, cache_dir = Path(root).resolve(), Path(cache_dir)
    if size < 1 or shard_size < 1 or not 1 <= quality <= 100:
        raise DataError(
            f"size and shard_size must be >= 1 and quality 1..100, got {size}, {shard_size}, {quality}"
        )
    requested = list(dict.fromkeys(Path(p).as_posix() for p in paths))
    outside = [p for p in requested if Path(p).is_absolute() or ".." in Path(p).parts]
    if outside:
        raise DataError(f"image paths must be relative to the archive root {root}, got {outside[0]!r}")

    manifest = _read_manifest(cache_dir)
    if manifest is None:
        if cache_dir.exists() and any(p.name != LOCK_FILE for p in cache_dir.iterdir()):
            raise DataError(f"{cache_dir} is not empty and holds no {MANIFEST}: it is not a cache folder")
        plan: list[list[str]] = []
    else:
        if manifest.get("size") != size:
            raise DataError(
                f"cache {cache_dir} was built at {manifest.get('size')} px, asked for {size} px; "
                f"use another cache folder for {size} px (or --size {manifest.get('size')})"
            )
        for key, value in (("quality", quality), ("root", str(root))):
            if manifest.get(key) != value:
                raise DataError(
                    f"cache {cache_dir} was built with {key} {manifest.get(key)}, asked for {value}; "
                    f"use another cache folder (or --{key} {manifest.get(key)})"
                )
        plan = [s["files"] for s in manifest["shards"]]

    planned = {p for files in plan for p in files}
    new = [p for p in requested if p not in planned]
    plan += [new[i : i + shard_size] for i in range(0, len(new), shard_size)]
    records: dict[int, dict] = {}
    for i, files in enumerate(plan):
        record = _read_record(cache_dir, i, files, size, quality)
        if record is not None:
            records[i] = record
    todo = [i for i in range(len(plan)) if i not in records]
    shards_reused = len(records)

    header = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "size": size,
        "quality": quality,
        "root": str(root),
    }
    if todo or manifest is None or not manifest.get("complete"):
        # The plan goes to disk before any shard, so that a killed run is resumed with the same shards.
        shard_list = [{"name": f"{_shard_name(i)}.bin", "files": files} for i, files in enumerate(plan)]
        atomic_write_json(cache_dir / MANIFEST, {**header, "complete": False, "shards": shard_list})

    n_new = 0
    n_todo = sum(len(plan[i]) for i in todo)
    with (
        _shard_results(root, cache_dir, plan, todo, size, quality, workers) as results,
        Progress(f"caching at {size} px", n_todo, enabled=progress and bool(todo)) as bar,
    ):
        for i, record in results:
            records[i] = record
            n_new += len(record["paths"])
            bar.advance(len(record["files"]))

    final = _final_manifest(header, plan, records)
    if todo or manifest is None or not manifest.get("complete"):
        atomic_write_json(cache_dir / MANIFEST, final)
    locations, skipped = final["locations"], final["skipped"]
    return CacheReport(
        cache_dir=cache_dir,
        size=size,
        n_requested=len(requested),
        n_cached=sum(p in locations for p in requested),
        n_new=n_new,
        skipped={p: skipped[p] for p in requested if p in skipped},
        shards_built=len(todo),
        shards_reused=shards_reused,
        elapsed_s=time.perf_counter() - start,
    )


@contextlib.contextmanager
def _shard_results(
    root: Path,
    cache_dir: Path,
    plan: list[list[str]],
    todo: list[int],
    size: int,
    quality: int,
    workers: int | None,
) -> Iterator[Iterator[tuple[int, dict]]]:
    """Start building the shards ``todo``; yields an iterator of ``(shard index, record)`` in finishing order.

    With several workers, every worker process is started on entry, before the caller starts any thread.
    """
    args = [(str(root), str(cache_dir), i, plan[i], size, quality) for i in todo]
    if not workers or workers <= 1 or len(todo) <= 1:
        yield ((a[2], _build_shard(*a)) for a in args)
        return
    executor = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=pool_context())
    try:
        index_of = {executor.submit(_build_shard, *a): a[2] for a in args}
        yield ((index_of[f], f.result()) for f in as_completed(index_of))
    finally:
        # On an error or an interrupt, queued shards are dropped; finished ones are already recorded.
        executor.shutdown(wait=True, cancel_futures=True)


def _final_manifest(header: dict, plan: list[list[str]], records: dict[int, dict]) -> dict:
    locations: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    shards = []
    for i, files in enumerate(plan):
        record = records[i]
        shards.append({"name": f"{_shard_name(i)}.bin", "files": files, "bytes": record["bytes"]})
        for path, offset, length in zip(record["paths"], record["offsets"], record["lengths"], strict=True):
            locations[path] = [i, offset, length]
        skipped.update(record["skipped"])
    counts = {
        "images": len(locations),
        "skipped": len(skipped),
        "shards": len(plan),
        "bytes": sum(s["bytes"] for s in shards),
    }
    return {
        **header,
        "complete": True,
        "counts": counts,
        "shards": shards,
        "locations": locations,
        "skipped": skipped,
    }


class ImageCache:
    """Read access to a prepared cache, by image path relative to the archive root.

    Cheap to pickle and safe to use from forked DataLoader workers: the lookup table is a few numpy arrays
    (no per-path Python objects whose reference counts would make every worker copy the pages), and shard
    files are opened lazily in each process and read with ``os.pread``, which has no shared file position.

    Args:
        cache_dir: a folder built by :func:`prepare_cache`.
        expected_size: when given, the size the cache must have been built at.

    Raises:
        DataError: when the folder holds no manifest, the build did not finish (or is still running: the
            message names the prepare that holds the lock), or the size differs from ``expected_size``.
    """

    def __init__(self, cache_dir: Path, expected_size: int | None = None):
        self.cache_dir = Path(cache_dir)
        manifest = _read_manifest(self.cache_dir)
        if manifest is None:
            raise DataError(
                f"{self.cache_dir} holds no {MANIFEST}: build the cache with `ssl-kvasir prepare`"
            )
        if not manifest.get("complete"):
            holder = lock_holder(self.cache_dir)
            if holder is not None:
                raise DataError(
                    f"cache {self.cache_dir} is still being built by {holder}: wait for it to finish"
                )
            raise DataError(
                f"cache {self.cache_dir} is incomplete (its build was interrupted): rerun ssl-kvasir prepare"
            )
        self.size: int = manifest["size"]
        if expected_size is not None and self.size != expected_size:
            raise DataError(
                f"cache {self.cache_dir} was built at {self.size} px, asked for {expected_size}; "
                f"rebuild it with --size {expected_size} into another folder"
            )
        self.quality: int = manifest["quality"]
        self.root = Path(manifest["root"])
        self.skipped: dict[str, str] = manifest["skipped"]
        self._shard_files = [s["name"] for s in manifest["shards"]]
        locations = manifest["locations"]
        keys = np.array([p.encode("utf-8") for p in locations], dtype=bytes)  # (N,) fixed-width byte strings
        where = np.array(list(locations.values()), dtype=np.int64).reshape(
            -1, 3
        )  # (N, 3) shard, offset, length
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]  # (N,) sorted for binary search
        self._where = where[order]  # (N, 3)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, Path)) and self._row(path) >= 0

    def __repr__(self) -> str:
        return f"ImageCache({str(self.cache_dir)!r}, {len(self)} images at {self.size} px)"

    @property
    def paths(self) -> list[str]:
        """Every cached path, sorted."""
        return [k.decode("utf-8") for k in self._keys]

    def _row(self, path: str | Path) -> int:
        key = Path(path).as_posix().encode("utf-8")
        i = int(np.searchsorted(self._keys, key))
        return i if i < len(self._keys) and self._keys[i] == key else -1

    def missing(self, paths: Iterable[str]) -> list[str]:
        """The paths of ``paths`` that are not in the cache, in the order given."""
        paths = [Path(p).as_posix() for p in paths]
        if not paths:
            return []
        keys = np.array([p.encode("utf-8") for p in paths], dtype=bytes)  # (M,)
        i = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))  # (M,)
        found = self._keys[i] == keys if len(self._keys) else np.zeros(len(keys), dtype=bool)  # (M,)
        return [p for p, hit in zip(paths, found, strict=True) if not hit]

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            # A forked child inherits the parent's descriptors; it opens its own rather than share them.
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.cache_dir / self._shard_files[shard], os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def read_bytes(self, path: str | Path) -> bytes:
        """The cached JPEG bytes of ``path``.

        Raises:
            DataError: when ``path`` is not in the cache (with the reason when it was skipped), or the shard
                file is shorter than the manifest says.
        """
        row = self._row(path)
        if row < 0:
            p = Path(path).as_posix()
            why = f": it was skipped ({self.skipped[p]})" if p in self.skipped else ""
            raise DataError(f"{p} is not in cache {self.cache_dir}{why}")
        shard, offset, length = (int(x) for x in self._where[row])
        data = os.pread(self._fd(shard), length, offset)
        if len(data) != length:
            raise DataError(f"{self.cache_dir / self._shard_files[shard]} is truncated: rebuild the cache")
        return data

    def load(self, path: str | Path, min_size: int | None = None) -> Image.Image:
        """The cached image of ``path`` as RGB, DCT-scaled down while its shorter side stays >= ``min_size``."""
        return decode_image(
            self.read_bytes(path), min_size, name=f"{Path(path).as_posix()} in cache {self.cache_dir}"
        )

    def close(self) -> None:
        """Close the shard files this process opened (reading again reopens them)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}  # descriptors mean nothing in another process
        return state

    def __del__(self) -> None:
        # At interpreter exit or after a failed __init__ there may be nothing (left) to close.
        with contextlib.suppress(OSError, AttributeError):
            self.close()
