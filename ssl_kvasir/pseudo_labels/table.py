"""Pseudo-label tables: building, selecting, writing and reading them, and the authors' prediction files.

Three file formats:

- **ssl_kvasir**: a CSV with the columns :data:`PSEUDO_LABEL_COLUMNS`, one row per image. This is what
  ``ssl-kvasir export-pseudo-labels`` writes and what the self-training method reads back as its
  pseudo-labeled set. Floats are written with Python's shortest round-trip repr, so reading a file gives
  back exactly the numbers that were written.
- **authors**: the format of the HyperKvasir authors' predictions on the unlabeled images (Borgli et al.
  2020): ``filename,predicted-label,A,B,...,W``; the bare file name, the predicted class index in the paper's
  order (= :data:`HYPERKVASIR_CLASSES`), and one probability per class with 3 decimals.
- **label-studio**: Label Studio's task JSON (written with its labelling config) and its JSON export (read
  back; a submitted annotation overrides the prediction): :mod:`ssl_kvasir.pseudo_labels.label_studio`.

Writers stream their rows in chunks into an atomic temporary file: the memory they add is one chunk of
text, and a failure halfway leaves the previous file (or none), never half of one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write
from ssl_kvasir.pseudo_labels import label_studio
from ssl_kvasir.pseudo_labels.selection import select_pseudo_labels as select

PSEUDO_LABEL_COLUMNS = [
    "filename",
    "path",
    "predicted_class",
    "paper_index",
    "confidence",
    "margin",
    "entropy",
    "knn_class",
    "knn_agrees",
    "cluster",
    "outlier_score",
    "checkpoint",
]
"""Columns of the ssl_kvasir pseudo-label CSV, in file order.

- ``filename``: the bare image file name (join key to the archive); ``path``: path relative to the root.
- ``predicted_class``: the class folder name; ``paper_index``: its index (the model's output index).
- ``confidence``: the top probability; ``margin``: top-1 minus top-2 probability; ``entropy``: of the
  predicted distribution, in nats.
- ``knn_class``, ``knn_agrees``: the kNN vote's class and whether it equals ``predicted_class`` (empty
  without kNN).
- ``cluster``, ``outlier_score``: HDBSCAN cluster (-1 = noise) and GLOSH score (empty without clustering).
- ``checkpoint``: the model (or file) the predictions come from.
"""

AUTHORS_FIRST_COLUMNS = ["filename", "predicted-label"]
CHUNK_ROWS = 16384  # rows built or written at a time: bounds the (rows, C) temporaries and the text held


def _bare_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _check_probs(probs: np.ndarray, n_rows: int, n_classes: int, where: str) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.shape != (n_rows, n_classes):
        raise DataError(f"{where}: probabilities have shape {probs.shape}, expected ({n_rows}, {n_classes})")
    return probs


# -- the authors' format -----------------------------------------------------------------------------------


def authors_header(classes: ClassTable = HYPERKVASIR_CLASSES) -> list[str]:
    """``filename,predicted-label`` and one letter per class (A..W for HyperKvasir)."""
    return AUTHORS_FIRST_COLUMNS + classes.letters


def read_authors_predictions(
    path: str | os.PathLike, classes: ClassTable = HYPERKVASIR_CLASSES
) -> pd.DataFrame:
    """Read a prediction file in the authors' format.

    Returns:
        one row per line: ``filename``, ``paper_index`` (int), ``predicted_class`` (folder name) and one
        float column per class letter (``A`` .. ``W``).

    Raises:
        DataError: naming the file and line, for a wrong header, a wrong number of fields, a file name with a
            folder in it, a predicted index outside ``0..C-1``, a probability that does not parse or lies
            outside [0, 1], or a file name listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prediction file {path} does not exist")
    header = authors_header(classes)
    n_fields = len(header)
    names, predicted, rows = [], [], []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        got = [h.strip() for h in next(reader, [])]
        if got != header:
            raise DataError(
                f"{path}:1: header is {','.join(got) or '(empty)'!r}; expected {','.join(header)!r} "
                f"(comma-separated, one probability column per class letter)"
            )
        for lineno, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != n_fields:
                raise DataError(
                    f"{path}:{lineno}: expected {n_fields} comma-separated fields, got {len(fields)}"
                )
            name = fields[0].strip()
            if not name or name != _bare_name(name):
                raise DataError(f"{path}:{lineno}: file name {name!r} must be a bare file name (no folders)")
            if name in seen:
                raise DataError(
                    f"{path}:{lineno}: file name {name!r} is listed twice (first on line {seen[name]})"
                )
            seen[name] = lineno
            label = fields[1].strip()
            if not label.isdigit() or int(label) >= len(classes):
                raise DataError(
                    f"{path}:{lineno}: predicted-label {label!r} is not a class index 0..{len(classes) - 1}"
                )
            try:
                values = [float(v) for v in fields[2:]]
            except ValueError:
                text = next(v for v in fields[2:] if not _parses(v))
                raise DataError(f"{path}:{lineno}: probability {text!r} is not a number") from None
            if not all(0.0 <= v <= 1.0 for v in values):
                outside = next(v for v in values if not 0.0 <= v <= 1.0)
                raise DataError(f"{path}:{lineno}: probability {outside!r} is outside [0, 1]")
            names.append(name)
            predicted.append(int(label))
            rows.append(values)
    if not names:
        raise DataError(f"{path}: the prediction file lists no images")
    table = pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=classes.letters)
    table.insert(0, "filename", names)
    table.insert(1, "paper_index", np.asarray(predicted, dtype=np.int64))
    table.insert(2, "predicted_class", [classes[i].folder for i in predicted])
    return table


def _parses(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_authors_predictions(
    path: str | os.PathLike,
    filenames: Sequence[str],
    probs: np.ndarray,
    predicted: np.ndarray | None = None,
    classes: ClassTable = HYPERKVASIR_CLASSES,
) -> None:
    """Write predictions in the authors' format, atomically, in chunks.

    Args:
        path: the CSV to write.
        filenames: N bare file names (a path is reduced to its file name, as in the authors' files).
        probs: ``(N, C)`` class probabilities, written as ``%.3f``.
        predicted: ``(N,)`` predicted class indices; default ``argmax(probs)``.
        classes: the class table (its letters head the probability columns).

    Raises:
        DataError: for mismatched lengths, a file name with a comma, an index outside ``0..C-1`` or a
            probability outside [0, 1] (nothing is written then).
    """
    path = Path(path)
    names = [_bare_name(str(n)) for n in filenames]
    probs = _check_probs(probs, len(names), len(classes), str(path))
    if predicted is not None:
        predicted = np.asarray(predicted, dtype=np.int64)
        if predicted.shape != (len(names),):
            raise DataError(f"{path}: {len(predicted)} predicted labels for {len(names)} file names")
    bad_name = next((n for n in names if "," in n or "\n" in n or not n), None)
    if bad_name is not None:
        raise DataError(
            f"{path}: file name {bad_name!r} cannot be written unquoted in a comma-separated file"
        )
    row_format = "{},{}" + ",{:.3f}" * len(classes) + "\n"
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(authors_header(classes)) + "\n")
        for start in range(0, len(names), CHUNK_ROWS):
            block = np.asarray(probs[start : start + CHUNK_ROWS], dtype=np.float64)  # (b, C)
            if not (np.isfinite(block).all() and block.min() >= 0.0 and block.max() <= 1.0):
                raise DataError(
                    f"{path}: probabilities of rows {start}..{start + len(block) - 1} are not all in [0, 1]"
                )
            labels = block.argmax(axis=1) if predicted is None else predicted[start : start + len(block)]
            if labels.min() < 0 or labels.max() >= len(classes):
                raise DataError(f"{path}: a predicted label lies outside 0..{len(classes) - 1}")
            f.write(
                "".join(
                    row_format.format(name, label, *row)
                    for name, label, row in zip(
                        names[start : start + len(block)], labels.tolist(), block.tolist(), strict=True
                    )
                )
            )


# -- the ssl_kvasir pseudo-label table -----------------------------------------------------------------------


def build_pseudo_label_table(
    paths: Sequence[str] | np.ndarray,
    probs: np.ndarray,
    classes: ClassTable = HYPERKVASIR_CLASSES,
    knn_probs: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
    outlier_scores: np.ndarray | None = None,
    checkpoint: str = "",
    predicted: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per image with the model's pseudo-label and how far to trust it.

    Args:
        paths: N image paths (relative to the archive root) or bare file names (a list or an array of them).
        probs: ``(N, C)`` class probabilities (a memmap is read in chunks).
        classes: the class table.
        knn_probs: ``(N, C)`` kNN vote probabilities, for ``knn_class`` and ``knn_agrees``.
        clusters: ``(N,)`` cluster per image (-1 = noise).
        outlier_scores: ``(N,)`` outlier score per image.
        checkpoint: where the predictions come from.
        predicted: ``(N,)`` predicted classes when they are not ``argmax(probs)`` (the authors' files give
            their own); ``confidence`` is then the predicted class's probability and ``margin`` its lead
            over the best other class (negative when another class has more).

    Returns:
        a frame with the columns :data:`PSEUDO_LABEL_COLUMNS` and a 0..N-1 index.
    """
    paths = [str(p) for p in paths]
    n, n_classes = len(paths), len(classes)
    probs = _check_probs(probs, n, n_classes, "pseudo-label table")
    if knn_probs is not None:
        knn_probs = _check_probs(knn_probs, n, n_classes, "pseudo-label table (kNN)")
    for name, arr in (("clusters", clusters), ("outlier_scores", outlier_scores), ("predicted", predicted)):
        if arr is not None and np.shape(arr) != (n,):
            raise DataError(f"pseudo-label table: {name} has shape {np.shape(arr)}, expected ({n},)")
    top = np.empty(n, np.int64)
    confidence, margin, entropy = np.empty(n), np.empty(n), np.empty(n)
    knn_top = np.empty(n, np.int64)
    rows = np.arange(min(n, CHUNK_ROWS))
    # Chunks keep the (rows, C) temporaries (sorting, logs) bounded whatever N is.
    for start in range(0, n, CHUNK_ROWS):
        p = np.asarray(probs[start : start + CHUNK_ROWS], dtype=np.float64)  # (b, C)
        b = len(p)
        pred = (
            p.argmax(axis=1)
            if predicted is None
            else np.asarray(predicted[start : start + b], dtype=np.int64)
        )
        if pred.min() < 0 or pred.max() >= n_classes:
            raise DataError(f"pseudo-label table: a predicted class lies outside 0..{n_classes - 1}")
        conf = p[rows[:b], pred]  # (b,)
        others = p.copy()
        others[rows[:b], pred] = -np.inf
        top[start : start + b] = pred
        confidence[start : start + b] = conf
        margin[start : start + b] = conf - others.max(axis=1)
        entropy[start : start + b] = -(p * np.log(p, out=np.zeros_like(p), where=p > 0)).sum(
            axis=1
        )  # 0 log 0 = 0
        if knn_probs is not None:
            knn_top[start : start + b] = np.asarray(knn_probs[start : start + b]).argmax(axis=1)
    names = np.asarray(classes.names, dtype=object)
    # copy=False: the columns are arrays made here (the caller's are copied first), so the frame can own them
    # instead of copying each once more into consolidated blocks.
    return pd.DataFrame(
        {
            "filename": [_bare_name(p) for p in paths],
            "path": paths,
            "predicted_class": names[top],
            "paper_index": top,
            "confidence": confidence,
            "margin": margin,
            "entropy": entropy,
            "knn_class": names[knn_top] if knn_probs is not None else np.full(n, "", dtype=object),
            "knn_agrees": pd.array(knn_top == top if knn_probs is not None else [pd.NA] * n, dtype="boolean"),
            "cluster": pd.array(clusters if clusters is not None else [pd.NA] * n, dtype="Int64"),
            "outlier_score": (
                np.array(outlier_scores, dtype=np.float64)
                if outlier_scores is not None
                else np.full(n, np.nan)
            ),
            "checkpoint": np.full(n, checkpoint, dtype=object),
        },
        copy=False,
    )


def select_pseudo_labels(
    df: pd.DataFrame,
    min_confidence: float = 0.0,
    top_k_per_class: int | None = None,
    require_agreement: bool = False,
) -> pd.DataFrame:
    """Keep the pseudo-labels worth training on (the rule of
    :func:`ssl_kvasir.pseudo_labels.selection.select_pseudo_labels`, on a table).

    Args:
        df: a pseudo-label table.
        min_confidence: keep rows with ``confidence >= min_confidence``.
        top_k_per_class: then keep at most the k most confident rows of each predicted class (ties: the
            earlier row). Capping each class is how self-training keeps the common classes from swamping the
            rare ones.
        require_agreement: keep only rows whose kNN vote agrees with the model.

    Returns:
        the kept rows in their original order, with their original index (so ``probs[kept.index]`` picks
        the matching probabilities).

    Raises:
        ConfigError: for a negative k, or ``require_agreement`` on a table without kNN.
    """
    if top_k_per_class is not None and top_k_per_class < 0:
        raise ConfigError(f"top_k_per_class must be >= 0, got {top_k_per_class}")
    agrees = None
    if require_agreement:
        agrees = df.knn_agrees.astype("boolean")
        if agrees.isna().all() and len(df):
            raise ConfigError(
                "require_agreement needs kNN columns, but this pseudo-label table has no kNN vote"
            )
        agrees = agrees.fillna(False).to_numpy(dtype=bool)
    positions = select(
        df.confidence.to_numpy(),
        df.paper_index.to_numpy(),
        int(df.paper_index.max()) + 1 if len(df) else 0,
        min_confidence=min_confidence,
        balance="none" if top_k_per_class is None else "cap",
        max_per_class=top_k_per_class,
        agrees=agrees,
    )
    return df.iloc[positions]


def write_pseudo_labels(
    df: pd.DataFrame,
    path: str | os.PathLike,
    format: str = "ssl_kvasir",
    probs: np.ndarray | None = None,
    classes: ClassTable = HYPERKVASIR_CLASSES,
    image_prefix: str = label_studio.LOCAL_FILES_PREFIX,
) -> Path:
    """Write a pseudo-label table atomically, chunk by chunk.

    Args:
        df: a table with the columns :data:`PSEUDO_LABEL_COLUMNS`.
        path: the file to write.
        format: ``ssl_kvasir`` (every column), ``authors`` (the authors' prediction-file format) or
            ``label-studio`` (Label Studio tasks, and ``<stem>.label_config.xml`` beside them).
        probs: ``(len(df), C)`` probabilities, one row per row of ``df``; required by ``authors``.
        classes: the class table (``authors`` and ``label-studio``).
        image_prefix: ``label-studio`` only: what comes before each image's path in its URL
            (:func:`ssl_kvasir.pseudo_labels.label_studio.write_tasks`).

    Returns:
        ``path``.

    Raises:
        ConfigError: for an unknown format or ``authors`` without ``probs``.
        DataError: when ``df`` lacks columns.
    """
    path = Path(path)
    if list(df.columns) != PSEUDO_LABEL_COLUMNS:
        raise DataError(
            f"{path}: a pseudo-label table needs the columns {PSEUDO_LABEL_COLUMNS}, got {list(df.columns)}"
        )
    if format == "authors":
        if probs is None:
            raise ConfigError(f"{path}: the authors' format needs the class probabilities (probs=)")
        write_authors_predictions(path, df.filename.tolist(), probs, df.paper_index.to_numpy(), classes)
    elif format == "ssl_kvasir":
        with atomic_write(path, "w", encoding="utf-8", newline="") as f:
            for start in range(0, max(len(df), 1), CHUNK_ROWS):
                df.iloc[start : start + CHUNK_ROWS].to_csv(
                    f, index=False, header=start == 0, lineterminator="\n"
                )
    elif format == "label-studio":
        label_studio.write_tasks(df, path, image_prefix=image_prefix, classes=classes)
    else:
        raise ConfigError(
            f"unknown pseudo-label format {format!r}; valid formats: ssl_kvasir, authors, label-studio"
        )
    return path


def _first_bad(path: Path, bad: np.ndarray, column: str, values: pd.Series, why: str) -> None:
    """Raise a DataError naming the first row flagged in ``bad`` by its line number (header = line 1)."""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}:{i + 2}: {column} {values.iloc[i]!r} {why}")


def read_pseudo_labels(path: str | os.PathLike, classes: ClassTable = HYPERKVASIR_CLASSES) -> pd.DataFrame:
    """Read a pseudo-label file: the ssl_kvasir format, the authors' format (recognised by its header) or
    Label Studio's JSON export (recognised by its opening bracket).

    An authors' file becomes a table through :func:`build_pseudo_label_table` with their predicted labels,
    ``path`` = ``filename`` and ``checkpoint`` = the file's path. A Label Studio export becomes one row per task
    that has a class (:func:`_label_studio_table`).

    Returns:
        a frame with the columns :data:`PSEUDO_LABEL_COLUMNS` and the types :func:`build_pseudo_label_table`
        gives (class names canonicalised to the archive's folder spelling).

    Raises:
        DataError: naming the file (and line), for missing or extra columns, an unknown class, a
            ``paper_index`` that is not the class's index, a number that does not parse, a confidence outside
            [0, 1], or a path listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pseudo-label file {path} does not exist")
    with path.open(encoding="utf-8-sig") as f:
        first = f.readline()
    if first.lstrip().startswith(("[", "{")):
        return _label_studio_table(label_studio.read_export(path, classes), classes)
    if first.startswith(",".join(AUTHORS_FIRST_COLUMNS)):
        authors = read_authors_predictions(path, classes)
        return build_pseudo_label_table(
            authors.filename.tolist(),
            authors[classes.letters].to_numpy(),
            classes,
            checkpoint=str(path),
            predicted=authors.paper_index.to_numpy(),
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if list(raw.columns) != PSEUDO_LABEL_COLUMNS:
        missing = [c for c in PSEUDO_LABEL_COLUMNS if c not in raw.columns]
        extra = [c for c in raw.columns if c not in PSEUDO_LABEL_COLUMNS]
        raise DataError(
            f"{path}: columns do not match a pseudo-label file (missing: {missing or 'none'}; unexpected: "
            f"{extra or 'none'}; expected in this order: {','.join(PSEUDO_LABEL_COLUMNS)})"
        )
    if raw.empty:
        raise DataError(f"{path}: the pseudo-label file lists no images")
    lookup = {name.lower(): c.index for c in classes for name in (c.folder, *c.aliases)}
    predicted = raw.predicted_class.str.lower().map(lookup)  # NaN for an unknown name
    _first_bad(
        path, predicted.isna().to_numpy(), "predicted_class", raw.predicted_class, "is not a class name"
    )
    index = pd.to_numeric(raw.paper_index, errors="coerce")
    _first_bad(
        path,
        (index != predicted).to_numpy(),
        "paper_index",
        raw.paper_index,
        "is not the index of its predicted_class",
    )
    numbers = {}
    for column in ("confidence", "margin", "entropy", "outlier_score"):
        blank = (raw[column] == "").to_numpy()
        values = pd.to_numeric(raw[column].mask(blank, "nan"), errors="coerce").to_numpy(dtype=np.float64)
        # outlier_score is empty for a table made without clustering; the others are always there.
        unparsed = np.isnan(values) & ~blank if column == "outlier_score" else np.isnan(values)
        _first_bad(path, unparsed, column, raw[column], "is not a number")
        numbers[column] = values
    confidence = numbers["confidence"]
    _first_bad(
        path, ~((confidence >= 0) & (confidence <= 1)), "confidence", raw.confidence, "is outside [0, 1]"
    )
    knn = raw.knn_class.str.lower().map(lookup)
    _first_bad(
        path,
        (knn.isna() & (raw.knn_class != "")).to_numpy(),
        "knn_class",
        raw.knn_class,
        "is not a class name",
    )
    agrees = raw.knn_agrees.map({"True": True, "False": False, "": pd.NA})
    _first_bad(
        path,
        agrees.isna().to_numpy() & (raw.knn_agrees != "").to_numpy(),
        "knn_agrees",
        raw.knn_agrees,
        "is not True, False or empty",
    )
    cluster = pd.to_numeric(raw.cluster.mask(raw.cluster == "", "nan"), errors="coerce")
    not_int = (cluster.isna() & (raw.cluster != "")) | (cluster.notna() & (cluster != cluster.round()))
    _first_bad(path, not_int.to_numpy(), "cluster", raw.cluster, "is not an integer")
    for column in ("filename", "path"):
        _first_bad(path, (raw[column] == "").to_numpy(), column, raw[column], "is empty")
    _first_bad(path, raw.path.duplicated().to_numpy(), "path", raw.path, "is listed twice")
    names = np.asarray(classes.names, dtype=object)
    top = predicted.to_numpy(dtype=np.int64)
    knn_names = np.asarray(classes.names + [""], dtype=object)  # position C: no kNN class
    return pd.DataFrame(
        {
            "filename": raw.filename,
            "path": raw.path,
            "predicted_class": names[top],
            "paper_index": top,
            "confidence": confidence,
            "margin": numbers["margin"],
            "entropy": numbers["entropy"],
            "knn_class": knn_names[knn.fillna(len(classes)).to_numpy(dtype=np.int64)],
            "knn_agrees": pd.array(agrees, dtype="boolean"),
            "cluster": pd.array(cluster, dtype="Int64"),
            "outlier_score": numbers["outlier_score"],
            "checkpoint": raw.checkpoint,
        }
    )


def _label_studio_table(tasks: label_studio.ReviewedTasks, classes: ClassTable) -> pd.DataFrame:
    """The pseudo-label table of a Label Studio export: a class a person chose has confidence and margin 1 and
    entropy 0 (a one-hot label) and ``checkpoint`` = :data:`~ssl_kvasir.pseudo_labels.label_studio.ANNOTATION_SOURCE`;
    a prediction left as it was keeps its score as the confidence and the margin and entropy of its task."""
    names = np.asarray(classes.names, dtype=object)
    knn_names = np.asarray(classes.names + [""], dtype=object)  # position C: no kNN class
    has_knn = tasks.knn_labels >= 0
    return pd.DataFrame(
        {
            "filename": [_bare_name(p) for p in tasks.paths],
            "path": tasks.paths,
            "predicted_class": names[tasks.labels],
            "paper_index": tasks.labels,
            "confidence": tasks.confidence,
            "margin": tasks.margin,
            "entropy": tasks.entropy,
            "knn_class": knn_names[np.where(has_knn, tasks.knn_labels, len(classes))],
            "knn_agrees": pd.array(
                [
                    bool(a) if k else pd.NA
                    for a, k in zip(tasks.knn_labels == tasks.labels, has_knn, strict=True)
                ],
                dtype="boolean",
            ),
            "cluster": pd.array(tasks.clusters, dtype="Float64").astype("Int64"),
            "outlier_score": tasks.outlier_scores,
            "checkpoint": tasks.sources,
        }
    )
