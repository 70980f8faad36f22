"""Finding and reading the ``results.json`` files that ``ssl-kvasir fit`` writes, for curves and reports."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from ssl_kvasir.errors import DataError

RESULTS_NAME = "results.json"


def is_number(value: object) -> bool:
    """A finite int or float (JSON booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def find_results_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` named by ``paths``: a file itself, or any folder above runs (searched recursively).

    Raises:
        DataError: naming the path, when it does not exist or holds no results file.
    """
    found: dict[tuple[int, int], Path] = {}
    for path in map(Path, paths):
        if path.is_file():
            below = [path]
        elif path.is_dir():
            # The whole name must match, so self-training's round_results.json files are not counted.
            below = sorted(Path(d) / RESULTS_NAME for d, _, names in os.walk(path) if RESULTS_NAME in names)
            if not below:
                raise DataError(f"no {RESULTS_NAME} in {path} or below it")
        else:
            raise DataError(f"{path} does not exist")
        for file in below:
            # A run folder and its parent name one file once: files are told apart by device and inode (one
            # stat each, where resolving the path would stat every folder above it).
            st = file.stat()
            found.setdefault((st.st_dev, st.st_ino), file)
    return list(found.values())


def results_error(path: Path, what: str) -> DataError:
    return DataError(f"results file {path}: {what}")


def read_results(path: Path, required: Iterable[str]) -> dict:
    """One results file as a dict, with its ``required`` fields present and ``method``, ``backbone`` (non-empty
    strings) and ``fold`` (a non-negative integer) checked where required.

    Raises:
        DataError: naming the file and the field that is missing or malformed.
    """
    try:
        results = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise DataError(f"cannot read results file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"results file {path} is not valid JSON: {e}") from None
    if not isinstance(results, dict):
        raise results_error(path, f"expected a JSON object, got {type(results).__name__}")
    required = list(required)
    for key in required:
        if key not in results:
            raise results_error(path, f"missing field {key!r}")
    for key in ("method", "backbone"):
        if key in required and (not isinstance(results[key], str) or not results[key].strip()):
            raise results_error(path, f"{key!r} must be a non-empty string, got {results[key]!r}")
    if "fold" in required and (not is_integer(results["fold"]) or results["fold"] < 0):
        raise results_error(path, f"'fold' must be a non-negative integer, got {results['fold']!r}")
    if "metrics" in required and not isinstance(results["metrics"], dict):
        raise results_error(path, f"'metrics' must be an object, got {type(results['metrics']).__name__}")
    return results
