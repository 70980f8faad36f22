"""Finding the results records that ``ssl-kvasir fit`` writes, for curves, reports and status.

Each record is read by :func:`ssl_kvasir.run.folder.read_results`, the one reader, which checks its format and
fields.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ssl_kvasir.errors import DataError
from ssl_kvasir.run.folder import RunFolder


def find_results_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every run's results record named by ``paths``: a file itself, or any folder above runs (searched
    recursively).

    Raises:
        DataError: naming the path, when it does not exist or holds no results file.
    """
    name = RunFolder.RESULTS
    found: dict[tuple[int, int], Path] = {}
    for path in map(Path, paths):
        if path.is_file():
            below = [path]
        elif path.is_dir():
            # The whole name must match, so the records of a run's stages are not counted as runs.
            below = sorted(Path(d) / name for d, _, names in os.walk(path) if name in names)
            if not below:
                raise DataError(f"no {name} in {path} or below it")
        else:
            raise DataError(f"{path} does not exist")
        for file in below:
            # A run folder and its parent name one file once: files are told apart by device and inode (one
            # stat each, where resolving the path would stat every folder above it).
            st = file.stat()
            found.setdefault((st.st_dev, st.st_ino), file)
    return list(found.values())
