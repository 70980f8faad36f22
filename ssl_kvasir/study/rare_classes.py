"""The recall of the rarest classes, system by system, beside the macro and micro scores of Table 3.

Imbalance-aware methods differ from plain ones mostly on the classes with a handful of images, which macro and
micro averages hide; :func:`rare_class_tables` shows them one by one (``ssl-kvasir report`` writes them below
Table 3 and as ``rare_classes.csv``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ssl_kvasir.study.table3 import METRIC_HEADERS, SystemSummary, format_figure, md_escape

RARE_CLASSES = 10
"""How many of the rarest classes the report lists one by one."""

RARE_SCORES = ("macro_recall", "macro_f1", "micro_f1", "mcc")
"""The fold-averaged scores shown beside the rare classes' recall."""


@dataclass(frozen=True)
class RareClassTable:
    """Recall of the rarest classes, a row per system, beside its macro and micro scores.

    Imbalance-aware methods differ from plain ones mostly on the classes with a handful of images, which macro
    and micro averages hide; this table shows them one by one.

    Attributes:
        classes: the rarest classes, rarest first: fewest evaluation images in the systems' summed confusion
            matrices (ties in class order).
        support: evaluation images of each class, over all the systems' runs.
        systems: the systems' names.
        scores: per system, :data:`RARE_SCORES` (means over folds, as in Table 3).
        recall: ``(S, K)`` recall of each system on each rare class, pooled over its runs (its summed confusion
            matrix); NaN where the system has no image of the class.
    """

    classes: tuple[str, ...]
    support: tuple[int, ...]
    systems: tuple[str, ...]
    scores: tuple[dict[str, float], ...]
    recall: np.ndarray

    @property
    def mean_recall(self) -> np.ndarray:
        """``(S,)`` mean recall over the rare classes each system has images of."""
        counted = ~np.isnan(self.recall)  # (S, K)
        total = np.where(counted, self.recall, 0.0).sum(1)  # (S,)
        return np.divide(total, counted.sum(1), out=np.full(len(total), np.nan), where=counted.any(1))


def rare_class_tables(systems: Sequence[SystemSummary], k: int = RARE_CLASSES) -> list[RareClassTable]:
    """The recall of the ``k`` rarest classes for each system; one table per class list the systems use."""
    groups: dict[tuple[str, ...], list[SystemSummary]] = {}
    for s in systems:
        groups.setdefault(tuple(s.classes), []).append(s)
    tables = []
    for classes, members in groups.items():
        support = np.sum([s.confusion.sum(1) for s in members], axis=0)  # (C,)
        rarest = np.lexsort((np.arange(len(classes)), support))[:k]  # (K,) by support, then class order
        recall = np.full((len(members), len(rarest)), np.nan)  # (S, K)
        for i, s in enumerate(members):
            true = s.confusion.sum(1)[rarest]  # (K,)
            hits = np.diag(s.confusion)[rarest]  # (K,)
            np.divide(hits, true, out=recall[i], where=true > 0)
        tables.append(
            RareClassTable(
                classes=tuple(classes[c] for c in rarest),
                support=tuple(int(support[c]) for c in rarest),
                systems=tuple(s.name for s in members),
                scores=tuple({key: s.metrics[key] for key in RARE_SCORES} for s in members),
                recall=recall,
            )
        )
    return tables


def render_rare_csv(tables: Iterable[RareClassTable]) -> str:
    """Long form, a row per system and rare class: ``system, rank, class, support, recall`` (4 decimals)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["system", "rank", "class", "support", "recall"])
    for t in tables:
        for i, system in enumerate(t.systems):
            for rank, (name, n) in enumerate(zip(t.classes, t.support, strict=True), start=1):
                recall = t.recall[i, rank - 1]
                writer.writerow(
                    [system, rank, name, n, "" if np.isnan(recall) else format_figure(float(recall), 4)]
                )
    return out.getvalue()


def render_rare_markdown(tables: Iterable[RareClassTable]) -> str:
    """Each table as Markdown: a row per system, its scores, the rare classes' mean recall, then each one's."""
    lines = []
    for t in tables:
        header = [
            "system",
            *(METRIC_HEADERS[key] for key in RARE_SCORES),
            f"mean recall, {len(t.classes)} rarest",
            *(f"{md_escape(name)} ({n})" for name, n in zip(t.classes, t.support, strict=True)),
        ]
        lines += [
            f"## Recall of the {len(t.classes)} rarest classes",
            "",
            "Classes ordered by their evaluation images (in brackets, all runs together); each recall is pooled "
            "over a system's runs, the other scores are means over folds as above.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for i, system in enumerate(t.systems):
            cells = [md_escape(system), *(format_figure(t.scores[i][key], 3) for key in RARE_SCORES)]
            cells += [
                "-" if np.isnan(v) else format_figure(float(v), 3) for v in (t.mean_recall[i], *t.recall[i])
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
