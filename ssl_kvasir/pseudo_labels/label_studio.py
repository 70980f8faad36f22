"""Label Studio's formats: the task file a clinician imports, its labelling config, and its JSON export read back.

Label Studio (the open-source annotation tool) imports a JSON list of tasks in its "basic JSON format": each task
has a ``data`` object (here the image's URL and, as extra Data Manager columns, what our analysis knows of it)
and may carry ``predictions``, each a ``result`` list of control-tag values with a ``score``. Our prediction is
one ``choices`` result (``from_name`` :data:`FROM_NAME` on the ``Image`` tag :data:`TO_NAME`) whose ``score``
is the classifier's confidence, so the Data Manager can sort the tasks by it. Its JSON export ("JSON" in the
Export dialog, the raw format of annotated tasks) returns the same tasks with an ``annotations`` list; an
annotation with ``was_cancelled: true`` is a skipped task.

This module knows nothing of the pseudo-label table's columns: :func:`write_tasks` takes the table's rows, and
:func:`read_export` returns plain arrays that :func:`ssl_kvasir.pseudo_labels.table.read_pseudo_labels` turns
into a table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write, atomic_write_text

FROM_NAME = "class"
"""The ``Choices`` control's name: the ``from_name`` of every prediction and annotation result."""
TO_NAME = "image"
"""The ``Image`` object's name (and the task's ``data`` key holding the image URL)."""
LOCAL_FILES_PREFIX = "/data/local-files/?d="
"""How Label Studio serves a file of its local-files storage: this prefix and the path below the document root
(``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``)."""
ANNOTATION_SOURCE = "label-studio annotation"
"""The ``checkpoint`` column of a row whose class a person chose in Label Studio."""
TASK_CHUNK = 4096  # tasks serialised at a time


def labeling_config(classes: ClassTable = HYPERKVASIR_CLASSES) -> str:
    """The labelling config (XML) of an image classification project over ``classes``: one ``Image`` tag and
    one single-choice ``Choices`` tag with a ``Choice`` per class folder name, in the table's order."""
    choices = "\n".join(f"    <Choice value={quoteattr(c.folder)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="false" required="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def config_path(tasks_path: str | os.PathLike) -> Path:
    """Where the labelling config goes beside a task file: ``<stem>.label_config.xml``."""
    tasks_path = Path(tasks_path)
    return tasks_path.with_name(f"{tasks_path.stem}.label_config.xml")


def _plain(value: object) -> object:
    """A JSON-safe scalar: NaN, NA and missing become null, numpy scalars plain Python."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def write_tasks(
    df: pd.DataFrame,
    path: str | os.PathLike,
    image_prefix: str = LOCAL_FILES_PREFIX,
    classes: ClassTable = HYPERKVASIR_CLASSES,
) -> tuple[Path, Path]:
    """Write a pseudo-label table as Label Studio tasks, and the project's labelling config beside them.

    Each row becomes one task: ``data.image`` = ``image_prefix`` + the row's path (URL-quoted), the row's other
    columns as Data Manager columns (``path``, ``confidence``, ``margin``, ``entropy``, ``knn_class``,
    ``knn_agrees``, ``cluster``, ``outlier_score``), and one prediction: the predicted class as a ``choices`` result, ``score`` =
    the confidence, ``model_version`` = the checkpoint.

    Args:
        df: a pseudo-label table (the columns of :data:`~ssl_kvasir.pseudo_labels.table.PSEUDO_LABEL_COLUMNS`).
        path: the task file (JSON) to write, atomically.
        image_prefix: what comes before the path: :data:`LOCAL_FILES_PREFIX` for Label Studio's local-files
            storage rooted at the archive, or a URL prefix (``https://host/hyper-kvasir/``) where a web server
            serves the archive.
        classes: the class table (the config's choices).

    Returns:
        the task file and the labelling config (:func:`config_path`).
    """
    path = Path(path)
    data_columns = [
        "path",
        "confidence",
        "margin",
        "entropy",
        "knn_class",
        "knn_agrees",
        "cluster",
        "outlier_score",
    ]
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write("[")
        for start in range(0, len(df), TASK_CHUNK):
            block = df.iloc[start : start + TASK_CHUNK]
            tasks: list[str] = []  # each a JSON object
            for row in block.itertuples(index=False):
                data: dict[str, Any] = {TO_NAME: image_prefix + quote(str(row.path))}
                data |= {c: _plain(getattr(row, c)) for c in data_columns}
                result = {
                    "id": f"p{start + len(tasks)}",
                    "type": "choices",
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "value": {"choices": [str(row.predicted_class)]},
                }
                prediction = {
                    "model_version": str(row.checkpoint),
                    "score": float(row.confidence),
                    "result": [result],
                }
                tasks.append(json.dumps({"data": data, "predictions": [prediction]}, ensure_ascii=False))
            f.write(("," if start else "") + "\n" + ",\n".join(tasks))
        f.write("\n]\n")
    config = config_path(path)
    atomic_write_text(config, labeling_config(classes))
    return path, config


@dataclass
class ReviewedTasks:
    """The tasks of a Label Studio export that carry a class, one entry per task (in file order).

    Attributes:
        paths: the image's path (``data.path``, else recovered from ``data.image``).
        labels: ``(M,)`` class index: the latest submitted annotation's choice, else the prediction's.
        confidence: ``(M,)`` 1 for an annotation, the prediction's ``score`` otherwise (0 when it has none).
        margin: ``(M,)`` 1 for an annotation, ``data.margin`` otherwise (NaN where there is none).
        entropy: ``(M,)`` 0 for an annotation, ``data.entropy`` otherwise (NaN where there is none).
        annotated: ``(M,)`` whether a person chose the class.
        knn_labels: ``(M,)`` the kNN class of ``data.knn_class``, -1 where there is none.
        clusters: ``(M,)`` ``data.cluster`` (NaN where there is none).
        outlier_scores: ``(M,)`` ``data.outlier_score`` (NaN where there is none).
        sources: where each class comes from: :data:`ANNOTATION_SOURCE` or the prediction's model version.
        skipped: tasks left out because every annotation of theirs was cancelled (skipped).
    """

    paths: list[str]
    labels: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    annotated: np.ndarray
    knn_labels: np.ndarray
    clusters: np.ndarray
    outlier_scores: np.ndarray
    sources: list[str]
    skipped: int


def _number(value: object) -> float:
    """A task's data field as a float; NaN when it is missing or not a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _image_path(image: str) -> str:
    """The path a task's image URL points at: the ``d`` parameter of a local-files URL, else the URL's last
    segment (a bare file name, matched to the pool by name)."""
    parts = urlsplit(image)
    if "d" in (query := parse_qs(parts.query)):
        return query["d"][0]
    return unquote(parts.path).rstrip("/").rsplit("/", 1)[-1]


def _choice(result: Sequence[dict], where: str) -> str | None:
    """The chosen class of a result list: the ``choices`` value of :data:`FROM_NAME` (or of the only
    ``choices`` result, for a project whose control has another name)."""
    if not isinstance(result, list):
        raise DataError(f"{where}: 'result' is not a list")
    found = [r for r in result if isinstance(r, dict) and r.get("type") == "choices"]
    named = [r for r in found if r.get("from_name") == FROM_NAME] or found
    if not named:
        return None
    chosen = (named[-1].get("value") or {}).get("choices") or []
    if len(chosen) != 1 or not isinstance(chosen[0], str):
        raise DataError(f"{where}: expected exactly one class in 'choices', got {chosen!r}")
    return chosen[0]


def read_export(path: str | os.PathLike, classes: ClassTable = HYPERKVASIR_CLASSES) -> ReviewedTasks:
    """Read Label Studio's JSON export of a project made from :func:`write_tasks`' file.

    A task's class is its latest submitted annotation's choice (by ``updated_at``, then ``created_at``, then
    position); a task without annotations keeps its prediction (the highest ``score``); a task whose every
    annotation was cancelled (skipped) is left out.

    Raises:
        DataError: naming the file and the task, for a file that is not a JSON list of tasks, a task without an
            image, a class that is not in ``classes``, a submitted annotation without a choice, a task with
            neither an annotation nor a prediction, or an image listed twice.
    """
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable Label Studio JSON export ({e})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise DataError(f"{path}: a Label Studio JSON export is a list of task objects")
    out: dict[str, list] = {
        k: []
        for k in ("paths", "labels", "conf", "margin", "entropy", "annotated", "knn", "cl", "out", "src")
    }
    seen: dict[str, str] = {}
    skipped = 0
    for position, task in enumerate(tasks):
        where = f"{path}: task {task.get('id', f'#{position + 1}')}"
        data = task.get("data")
        if not isinstance(data, dict) or not isinstance(data.get(TO_NAME) or data.get("path"), str):
            raise DataError(f"{where}: no image (data.{TO_NAME})")
        image_path = data.get("path") or _image_path(data[TO_NAME])
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        submitted = [a for a in annotations if not a.get("was_cancelled")]
        if annotations and not submitted:
            skipped += 1
            continue
        if submitted:
            order = sorted(
                range(len(submitted)),
                key=lambda i: (
                    str(submitted[i].get("updated_at") or ""),
                    str(submitted[i].get("created_at") or ""),
                    i,
                ),
            )
            latest = submitted[order[-1]]
            name = _choice(latest.get("result") or [], f"{where}, annotation {latest.get('id', '?')}")
            if name is None:
                raise DataError(f"{where}, annotation {latest.get('id', '?')}: no class chosen")
            confidence, source = 1.0, ANNOTATION_SOURCE
        else:
            predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
            if not predictions:
                raise DataError(f"{where}: neither an annotation nor a prediction gives it a class")
            best = max(predictions, key=lambda p: float(p.get("score") or 0.0))
            name = _choice(best.get("result") or [], f"{where}, prediction")
            if name is None:
                raise DataError(f"{where}: its prediction has no 'choices' result")
            confidence = float(best.get("score") or 0.0)
            if not 0.0 <= confidence <= 1.0:
                raise DataError(f"{where}: prediction score {confidence!r} is outside [0, 1]")
            source = str(best.get("model_version") or "label-studio prediction")
        if name not in classes:
            raise DataError(f"{where}: class {name!r} is not a class name")
        if image_path in seen:
            raise DataError(f"{where}: image {image_path!r} is listed twice (also in {seen[image_path]})")
        seen[image_path] = where.rsplit(": ", 1)[-1]
        knn = data.get("knn_class")
        out["paths"].append(image_path)
        out["labels"].append(classes.index(name))
        out["conf"].append(confidence)
        out["annotated"].append(source == ANNOTATION_SOURCE)
        out["knn"].append(classes.index(knn) if isinstance(knn, str) and knn in classes else -1)
        out["cl"].append(float(data["cluster"]) if isinstance(data.get("cluster"), int) else math.nan)
        out["out"].append(_number(data.get("outlier_score")))
        annotated = source == ANNOTATION_SOURCE
        out["margin"].append(1.0 if annotated else _number(data.get("margin")))
        out["entropy"].append(0.0 if annotated else _number(data.get("entropy")))
        out["src"].append(source)
    if not out["paths"]:
        raise DataError(f"{path}: the export holds no task with a class ({skipped} skipped)")
    return ReviewedTasks(
        paths=out["paths"],
        labels=np.asarray(out["labels"], dtype=np.int64),
        confidence=np.asarray(out["conf"], dtype=np.float64),
        margin=np.asarray(out["margin"], dtype=np.float64),
        entropy=np.asarray(out["entropy"], dtype=np.float64),
        annotated=np.asarray(out["annotated"], dtype=bool),
        knn_labels=np.asarray(out["knn"], dtype=np.int64),
        clusters=np.asarray(out["cl"], dtype=np.float64),
        outlier_scores=np.asarray(out["out"], dtype=np.float64),
        sources=out["src"],
        skipped=skipped,
    )
