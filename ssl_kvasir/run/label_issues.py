"""``ssl-kvasir label-issues``: suspect labels of the labeled training fold, ranked (``label_issues.csv``).

Out-of-fold probabilities come from k-fold training inside the training fold
(:func:`ssl_kvasir.analysis.label_noise.out_of_fold_probs` on the checkpoint's embeddings, reused when present);
cleanlab ranks the labels they contradict. The evaluation fold (``data.fold``) is never read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write_text
from ssl_kvasir.run.analyze import _out_dir, embed, load_checkpoint_and_data

log = logging.getLogger("ssl_kvasir")

ISSUE_COLUMNS = ["rank", "filename", "path", "given_class", "suggested_class", "label_quality"]
"""Columns of ``label_issues.csv``: ``rank`` 1 = most suspect; ``label_quality`` = the out-of-fold probability
of the given class."""


def label_issues(cfg: DictConfig) -> tuple[Path, int, int]:
    """Rank the suspect labels of the training fold; returns the CSV, the number flagged and the number checked.

    Raises:
        DataError: when the training fold holds no labeled image.
    """
    from ssl_kvasir.analysis.label_noise import out_of_fold_probs, rank_label_issues

    module, exp = load_checkpoint_and_data(cfg)
    classes = exp.catalog.classes
    store = embed(cfg, module, exp)
    rows = np.flatnonzero((store.labels >= 0) & (store.folds >= 0) & (store.folds != cfg.data.fold))
    if not len(rows):
        raise DataError(f"{cfg.data.root}: no labeled image outside evaluation fold {cfg.data.fold}")
    labels = store.labels[rows]
    probs = out_of_fold_probs(
        np.asarray(store.features[rows], dtype=np.float32),
        labels,
        len(classes),
        folds=cfg.label_issues.folds,
        seed=cfg.seed,
        regularization=cfg.label_issues.regularization,
    )  # (N_train, C)
    ranked = rank_label_issues(labels, probs)
    found = rows[ranked.position.to_numpy()]
    names = np.asarray(classes.names, dtype=object)
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(ranked) + 1),
            "filename": [Path(store.paths[i]).name for i in found],
            "path": [store.paths[i] for i in found],
            "given_class": names[ranked.given.to_numpy()],
            "suggested_class": names[ranked.suggested.to_numpy()],
            "label_quality": ranked.label_quality.to_numpy(),
        },
        columns=ISSUE_COLUMNS,
    )
    output = Path(cfg.output) if cfg.output else _out_dir(cfg) / "label_issues.csv"
    atomic_write_text(output, table.to_csv(index=False, lineterminator="\n"))
    log.info("%d of %d labeled training images flagged -> %s", len(table), len(rows), output)
    return output, len(table), len(rows)
