"""The on-disk embedding store: chunked writing, resuming a killed run, and archive checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ssl_kvasir.analysis.embeddings import (
    FEATURES_FILE,
    PROBS_FILE,
    EmbeddingWriter,
    archive_fingerprint,
    load_embeddings,
)
from ssl_kvasir.errors import ConfigError, DataError

N, D, C, CHUNK = 50, 8, 5, 16  # 4 chunks: 16 + 16 + 16 + 2 rows


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(N, D)).astype(np.float32)  # (N, D)
    probs = rng.dirichlet(np.ones(C), size=N).astype(np.float32)  # (N, C)
    paths = [f"unlabeled-images/images/{i:04d}.jpg" for i in range(N)]
    labels = np.where(np.arange(N) < 10, np.arange(N) % C, -1)
    folds = np.where(labels >= 0, np.arange(N) % 2, -1)
    return features, probs, paths, labels, folds


def _write_in_one_go(out: Path) -> None:
    features, probs, paths, labels, folds = _data()
    writer = EmbeddingWriter(out, N, D, C, chunk_rows=CHUNK, checkpoint="ckpt.pt")
    writer.write_index(paths, labels, folds)
    writer.add(features, probs)
    writer.finalize()


def test_store_round_trip(tmp_path: Path) -> None:
    _write_in_one_go(tmp_path / "emb")
    features, probs, paths, labels, folds = _data()
    emb = load_embeddings(tmp_path / "emb", expected_paths=reversed(paths))  # order does not matter
    assert isinstance(emb.features, np.memmap) and emb.features.dtype == np.float16
    np.testing.assert_array_equal(emb.features, features.astype(np.float16))
    np.testing.assert_array_equal(emb.probs, probs)
    assert list(emb.paths) == paths
    np.testing.assert_array_equal(emb.labels, labels)
    np.testing.assert_array_equal(emb.folds, folds)
    np.testing.assert_array_equal(emb.is_labeled, labels >= 0)
    assert emb.meta["n"] == N and emb.meta["dim"] == D and emb.meta["checkpoint"] == "ckpt.pt"
    assert emb.meta["archive_fingerprint"] == archive_fingerprint(paths)
    assert emb.row_of(paths[7]) == 7


def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    _write_in_one_go(tmp_path / "reference")
    out = tmp_path / "resumed"
    # A separate process writes two and a half chunks, the half one with wrong values, then dies by SIGKILL:
    # no finalize, no clean-up, exactly like a killed job.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_embeddings import _data, N, D, C, CHUNK
        from ssl_kvasir.analysis.embeddings import EmbeddingWriter
        features, probs, paths, labels, folds = _data()
        w = EmbeddingWriter({str(out)!r}, N, D, C, chunk_rows=CHUNK, checkpoint="ckpt.pt")
        w.write_index(paths, labels, folds)
        w.add(features[:20], probs[:20])      # chunk 0 complete, chunk 1 started
        w.add(features[20:32], probs[20:32])  # chunk 1 complete
        w.add(features[32:40] + 99, probs[32:40])  # half of chunk 2, wrong values
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode != 0
    with pytest.raises(DataError, match="unfinished embeddings \\(32 of 50 rows\\)"):
        load_embeddings(out)

    features, probs, paths, labels, folds = _data()
    writer = EmbeddingWriter(out, N, D, C, chunk_rows=CHUNK, checkpoint="ckpt.pt")
    writer.write_index(paths, labels, folds)
    assert writer.done_rows() == 32
    assert [writer.pending(c) for c in range(4)] == [False, False, True, True]
    rows = writer.pending_rows()
    np.testing.assert_array_equal(rows, np.arange(32, N))
    for start in range(0, len(rows), 5):  # another batch size than the killed run
        batch = rows[start : start + 5]
        writer.add(features[batch], probs[batch])
    writer.finalize()
    for name in (FEATURES_FILE, PROBS_FILE, "index.csv", "embeddings.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_finished_store_reopened_has_nothing_pending(tmp_path: Path) -> None:
    _write_in_one_go(tmp_path / "emb")
    writer = EmbeddingWriter(tmp_path / "emb", N, D, C, chunk_rows=CHUNK, checkpoint="ckpt.pt")
    assert writer.pending_chunks() == [] and writer.done_rows() == N


def test_changed_archive_is_reported(tmp_path: Path) -> None:
    _write_in_one_go(tmp_path / "emb")
    paths = _data()[2]
    changed = paths[3:] + ["unlabeled-images/images/new.jpg"]
    with pytest.raises(DataError, match="1 paths added .*new.jpg.*; 3 paths removed"):
        load_embeddings(tmp_path / "emb", expected_paths=changed)


def test_resume_with_other_settings_or_images_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "emb"
    features, probs, paths, labels, folds = _data()
    writer = EmbeddingWriter(out, N, D, C, chunk_rows=CHUNK, checkpoint="a.pt", checkpoint_sha256="sha256:a")
    writer.write_index(paths, labels, folds)
    writer.add(features[:CHUNK], probs[:CHUNK])
    # Keyed by the checkpoint's content: other bytes at the same path are refused, the same bytes elsewhere not.
    with pytest.raises(DataError, match="checkpoint_sha256: 'sha256:a' there, 'sha256:b' now"):
        EmbeddingWriter(out, N, D, C, chunk_rows=CHUNK, checkpoint="a.pt", checkpoint_sha256="sha256:b")
    with pytest.raises(DataError, match="dim: 8 there, 16 now"):
        EmbeddingWriter(out, N, 16, C, chunk_rows=CHUNK, checkpoint="a.pt", checkpoint_sha256="sha256:a")
    again = EmbeddingWriter(
        out, N, D, C, chunk_rows=CHUNK, checkpoint="moved.pt", checkpoint_sha256="sha256:a"
    )
    with pytest.raises(DataError, match="different image list \\(1 paths added"):
        again.write_index(paths[:-1] + ["other.jpg"], labels, folds)
    with pytest.raises(DataError, match="different order"):
        again.write_index(paths[::-1], labels, folds)
    again.write_index(paths, labels, folds)
    with pytest.raises(DataError, match="34 of 50 rows are not written"):
        again.finalize()


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    features, probs, paths, labels, folds = _data()
    writer = EmbeddingWriter(tmp_path / "emb", N, D, C, chunk_rows=CHUNK)
    with pytest.raises(ConfigError, match="write_index"):
        writer.add(features[:CHUNK], probs[:CHUNK])
    writer.write_index(paths)
    with pytest.raises(DataError, match="float16"):
        writer.add(features[:CHUNK] * 1e6, probs[:CHUNK])
    with pytest.raises(DataError, match="expected \\(3, 8\\)"):
        writer.add(features[:3], probs[:4])
    with pytest.raises(DataError, match="more than once"):
        writer.write_index(paths[:-1] + paths[:1])
    with pytest.raises(ConfigError, match="dtype"):
        EmbeddingWriter(tmp_path / "other", N, D, C, dtype=np.int8)
    progress = json.loads((tmp_path / "emb" / "progress.json").read_text())
    assert progress["done_chunks"] == []


def test_float32_store_keeps_exact_features(tmp_path: Path) -> None:
    features, probs, paths, *_ = _data()
    writer = EmbeddingWriter(tmp_path / "emb", N, D, C, dtype=np.float32, chunk_rows=N)
    writer.write_index(paths)
    writer.add(features, probs)
    writer.finalize()
    emb = load_embeddings(tmp_path / "emb")
    np.testing.assert_array_equal(emb.features, features)
    assert not emb.is_labeled.any() and (emb.labels == -1).all()


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an embedding store"):
        load_embeddings(tmp_path)


def test_store_is_keyed_by_checkpoint_content(tmp_path: Path) -> None:
    """What a store was computed from is the hash it records; removing a store leaves the rest of its folder."""
    from ssl_kvasir.analysis.embeddings import remove_store, store_checkpoint

    out = tmp_path / "emb"
    assert store_checkpoint(out) is None
    features, probs, paths, labels, folds = _data()
    writer = EmbeddingWriter(out, N, D, C, chunk_rows=CHUNK, checkpoint_sha256="sha256:a")
    writer.write_index(paths, labels, folds)
    assert store_checkpoint(out) == "sha256:a"  # unfinished: from progress.json
    writer.add(features, probs)
    writer.finalize()
    assert store_checkpoint(out) == "sha256:a" == load_embeddings(out).meta["checkpoint_sha256"]
    (out / "notes.txt").write_text("mine")
    remove_store(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert store_checkpoint(out) is None


FULL_DISK_SCRIPT = """
import os
import numpy as np
from ssl_kvasir.analysis.embeddings import EmbeddingWriter

disk = {disk!r}
# A store larger than the disk is refused before any row is computed.
try:
    EmbeddingWriter(disk + "/big", n_rows=4096, dim=64, num_classes=5)  # 512 KiB of float16 features
except OSError as e:
    print("big:", e.errno, e)
# A store that fits; then another file fills the disk and the next rows cannot be written.
writer = EmbeddingWriter(disk + "/fits", n_rows=1024, dim=32, num_classes=5, chunk_rows=256)
writer.write_index([f"{{i}}.jpg" for i in range(1024)])
fd = os.open(disk + "/filler", os.O_CREAT | os.O_WRONLY)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:
    pass
try:
    writer.add(np.ones((512, 32), np.float32), np.full((512, 5), 0.2, np.float32))
except OSError as e:
    print("fits:", e.errno, e)
"""


def test_a_full_disk_is_an_error_naming_the_file_never_a_sigbus(tmp_path: Path) -> None:
    """On a small tmpfs: a store that cannot fit is refused at once, and a disk that fills up while rows are
    written is an ENOSPC error naming the file (a memory-mapped store died by SIGBUS, exit 135, with nothing on
    stderr)."""
    from helpers import on_a_small_disk  # here: the killed-run test imports this module in a bare process

    disk = tmp_path / "small_disk"
    proc = on_a_small_disk(disk, "256k", [sys.executable, "-c", FULL_DISK_SCRIPT.format(disk=str(disk))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    big, fits = proc.stdout.splitlines()
    assert big.startswith(f"big: 28 [Errno 28] not enough space for {disk}/big/features.npy and ")
    assert "MiB needed" in big and "MiB free" in big
    assert fits == f"fits: 28 [Errno 28] cannot write {disk}/fits/features.npy: No space left on device"
