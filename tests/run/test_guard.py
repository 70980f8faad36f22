"""What keeps a run folder honest: the fingerprint holds the content of every input file, so an input edited
between a kill and the resume is refused, naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_kvasir.config import compose
from ssl_kvasir.run import guard
from ssl_kvasir.run.folder import RunFolder


def test_every_input_file_is_hashed_into_the_fingerprint(tmp_path: Path) -> None:
    split, review, weights = (tmp_path / name for name in ("split.csv", "review.csv", "w.pth"))
    for path in (split, review, weights):
        path.write_text(path.name)
    cfg = compose(
        "fit",
        [
            f"data.root={tmp_path}",
            f"output_dir={tmp_path / 'run'}",
            f"data.split_file={split}",
            "method=self_training",
            f"method.pseudo.file={review}",
            f"backbone.weights=[{weights},{weights}]",
        ],
    )
    found = guard.fingerprint(cfg)
    assert found["data.split_file#sha256"] == guard.file_hash(split)
    assert found["method.pseudo.file#sha256"] == guard.file_hash(review) != guard.file_hash(split)
    assert found["backbone.weights#sha256"] == [guard.file_hash(weights)] * 2
    assert found["data.split_file#sha256"].startswith("sha256:")


@pytest.mark.parametrize("key", ["method.pseudo.file", "data.split_file"])
def test_an_input_edited_since_the_run_started_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    """The reviewed pseudo-label file of self-training (issue 19: a run killed in round 1 trained on a mix of the
    old and the new labels after the file was edited) and the split file."""
    edited = tmp_path / "input.csv"
    edited.write_text("path,label\na.jpg,polyp\n")
    cfg = compose(
        "fit",
        [
            f"data.root={tmp_path}",
            f"output_dir={tmp_path / 'run'}",
            "method=self_training",
            f"{key}={edited}",
        ],
    )
    folder = RunFolder(tmp_path / "run")
    guard.begin(folder, guard.fingerprint(cfg))
    guard.check_folder(folder, guard.fingerprint(cfg), folder.results)  # unchanged: the run resumes
    edited.write_text("path,label\na.jpg,polyp\nb.jpg,ileum\n")
    with pytest.raises(guard.RunMismatch) as refused:
        guard.check_folder(folder, guard.fingerprint(cfg), folder.results)
    message = str(refused.value)
    assert f"{key} {edited} changed since the run started" in message and "put the file back" in message
    assert "\n" not in message
