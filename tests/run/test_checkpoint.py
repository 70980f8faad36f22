"""Checkpoints written and read in one line each: a full disk names the file and keeps the checkpoint already
there; a checkpoint holding objects other than tensors is refused in one line, without torch's advice."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest


def test_disk_full_while_saving_a_checkpoint_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """torch's zip writer turns ENOSPC into 'RuntimeError: ... unexpected pos'; the writer names file and
    cause, and the checkpoint already there is left as it was."""
    import contextlib
    import io

    import torch

    from ssl_kvasir.run import checkpoint as ckpt_module

    class FullDisk(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(b)

    @contextlib.contextmanager
    def full_disk(path, mode):
        yield FullDisk()

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(ckpt_module, "atomic_write", full_disk)
    with pytest.raises(OSError) as e:
        ckpt_module.AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000)}, target)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"[Errno 28] cannot write checkpoint {target}: No space left on device"
    assert target.read_bytes() == b"the previous checkpoint"


def test_a_refused_checkpoint_is_one_line_without_torch_advice(tmp_path: Path) -> None:
    import torch

    from ssl_kvasir.errors import DataError
    from ssl_kvasir.run.checkpoint import load_method
    from ssl_kvasir.run.guard import checkpoint_fingerprint

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": socket.socket}, path)  # an object loading as data refuses
    for load in (load_method, checkpoint_fingerprint):
        with pytest.raises(DataError) as e:
            load(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message
        assert "objects other than tensors" in message and "weights_only" not in message
