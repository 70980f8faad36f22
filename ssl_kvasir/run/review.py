"""``ssl-kvasir review``: the review page of a checkpoint's pseudo-labels (``<output_dir>/review/index.html``).

The analysis's views of the unlabeled images (classifier, kNN vote, clusters; embeddings reused when present)
give each image its review priority (:mod:`ssl_kvasir.analysis.priority`); the first ``review.limit`` images of
the selection in review order go on the page (:mod:`ssl_kvasir.analysis.review_page`), under the composition
figure of the whole pile, with the suspect labels of ``review.label_issues`` in a section of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from ssl_kvasir.errors import DataError
from ssl_kvasir.run.analyze import (
    Analysis,
    _out_dir,
    embed,
    knn_database,
    load_checkpoint_and_data,
    review_order,
    run_clusters,
    run_knn,
    select,
)
from ssl_kvasir.run.label_issues import ISSUE_COLUMNS

log = logging.getLogger("ssl_kvasir")


def read_label_issues(path: Path) -> pd.DataFrame:
    """A ``label_issues.csv`` of ``ssl-kvasir label-issues``.

    Raises:
        DataError: naming the file, when it is missing or its columns are not :data:`ISSUE_COLUMNS`.
    """
    if not path.is_file():
        raise DataError(f"review.label_issues: {path} does not exist")
    issues = pd.read_csv(path, keep_default_na=False)
    if list(issues.columns) != ISSUE_COLUMNS:
        raise DataError(
            f"{path}: columns {list(issues.columns)} are not those of label-issues ({ISSUE_COLUMNS})"
        )
    return issues


def review(cfg: DictConfig) -> Path:
    """Build the review page; returns its path."""
    from ssl_kvasir.analysis.composition import composition_table
    from ssl_kvasir.analysis.plots import plot_composition
    from ssl_kvasir.analysis.review_page import THUMB_DIR, make_thumbnails, render_review_page

    module, exp = load_checkpoint_and_data(cfg)
    classes, root = exp.catalog.classes, exp.catalog.root
    out = _out_dir(cfg) / "review"
    issues = read_label_issues(Path(cfg.review.label_issues)) if cfg.review.label_issues else None
    analysis = Analysis(
        store=embed(cfg, module, exp),
        eval_fold=cfg.data.fold,
        database_rows=knn_database(cfg, module, exp),
    )
    run_knn(cfg, analysis)
    if cfg.cluster.enabled:
        run_clusters(cfg, analysis)
    kept, rows = select(cfg, analysis, classes)
    ordered, priority = review_order(cfg, analysis, kept, rows)
    if cfg.review.limit is not None:
        ordered, priority = ordered.iloc[: cfg.review.limit], priority[: cfg.review.limit]
    log.info("making thumbnails of %d images in %s", len(ordered), out / THUMB_DIR)
    thumbs = make_thumbnails(root, ordered.path.tolist(), out / THUMB_DIR, size=cfg.review.thumb_size)
    issue_thumbs = (
        make_thumbnails(root, issues.path.tolist(), out / THUMB_DIR, size=cfg.review.thumb_size)
        if issues is not None
        else []
    )
    # The composition of the whole pile (not only of the page's images), as the classifier and the kNN see it.
    unl = np.flatnonzero(analysis.store.labels < 0)
    sources = {"classifier": np.asarray(analysis.store.probs[unl]).argmax(1)}
    if analysis.knn_probs is not None:
        sources["kNN"] = analysis.knn_probs[unl].argmax(1)
    figure = plot_composition(composition_table(sources, classes), out / "composition.png")
    page = render_review_page(
        out / "index.html",
        ordered,
        classes,
        thumbs=thumbs,
        priority=priority,
        composition_png=figure,
        label_issues=issues,
        issue_thumbs=issue_thumbs,
        group_by=cfg.review.group_by,
        page_size=cfg.review.page_size,
        title=f"Review of {Path(cfg.checkpoint).name}",
    )
    log.info("%d of %d unlabeled images on the review page", len(ordered), len(unl))
    return page
