"""What is in the unlabeled pile: embeddings, kNN, clusters, composition, pseudo-label export.

Built from a composed ``configs/analyze.yaml``; every step is a library call on arrays or files. A classifier
view (the checkpoint's predictions), a nearest-neighbour view (a similarity-weighted vote of the labeled
training images) and a cluster view (HDBSCAN on UMAP) are computed side by side.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from ssl_kvasir.config import require
from ssl_kvasir.errors import ConfigError, DataError
from ssl_kvasir.files import atomic_write_json, atomic_write_text, file_sha256
from ssl_kvasir.run.checkpoint import adopt_checkpoint_settings, load_method, require_same_data
from ssl_kvasir.run.experiment import build_datamodule, load_experiment
from ssl_kvasir.run.predict import Predictor

if TYPE_CHECKING:
    from ssl_kvasir.analysis.embeddings import Embeddings

log = logging.getLogger("ssl_kvasir")


@dataclass
class Analysis:
    """Everything computed for one checkpoint; arrays are indexed like the embedding store's rows."""

    store: Embeddings
    eval_fold: int
    database_rows: np.ndarray | None = None  # the kNN database (None: every labeled training-fold image)
    knn_probs: np.ndarray | None = None  # (N, C) for every row that is not a labeled training image
    knn_metrics: dict = field(default_factory=dict)
    clusters: np.ndarray | None = None  # (N,)
    outlier_scores: np.ndarray | None = None  # (N,)
    coords: np.ndarray | None = None  # (N, 2)
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def train_rows(self) -> np.ndarray:
        """Rows of the kNN database (never the evaluation fold): ``database_rows``, by default the
        checkpoint's own labeled images (:func:`knn_database`), or every labeled training-fold image."""
        if self.database_rows is not None:
            return self.database_rows
        s = self.store
        return np.flatnonzero((s.labels >= 0) & (s.folds >= 0) & (s.folds != self.eval_fold))

    @property
    def eval_rows(self) -> np.ndarray:
        """Rows of the evaluation fold."""
        s = self.store
        return np.flatnonzero((s.labels >= 0) & (s.folds == self.eval_fold))

    @functools.cached_property
    def train_features(self) -> np.ndarray:
        """(N_db, D) float32 features of the kNN database, read from the store once."""
        return np.asarray(self.store.features[self.train_rows], dtype=np.float32)


def _out_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.output:
        return Path(cfg.output).parent
    raise ConfigError("missing value for output_dir (pass output_dir=DIR)")


def store_dir(cfg: DictConfig) -> Path:
    """The embedding store: ``embeddings=DIR`` or ``<output_dir>/embeddings``."""
    return Path(cfg.embeddings) if cfg.embeddings else _out_dir(cfg) / "embeddings"


def load_checkpoint_and_data(cfg: DictConfig):
    """The trained method (EMA weights preferred) and the experiment's data, at the checkpoint's image size."""
    require(cfg, "checkpoint", "data.root")
    module = load_method(Path(cfg.checkpoint))
    adopt_checkpoint_settings(cfg, module, cfg.checkpoint)
    exp = load_experiment(cfg.data)
    require_same_data(module, cfg.checkpoint, exp, cfg.data.root)
    return module, exp


def knn_database(cfg: DictConfig, module, exp) -> np.ndarray | None:
    """Catalog rows of the kNN database: with ``knn.database=budget`` the labeled images the checkpoint was
    trained with (training and validation images of its label budget, cut again from the settings it stored),
    so that a kNN vote never uses labels the run did not have; None (every labeled training-fold image) with
    ``knn.database=all``.

    Raises:
        ConfigError: for another ``knn.database``, or an evaluation fold other than the checkpoint's.
        DataError: when the checkpoint does not record its labeled images, or they cannot be cut again here.
    """
    from ssl_kvasir.data.splits import rebuild_split

    if cfg.knn.database == "all":
        return None
    if cfg.knn.database != "budget":
        raise ConfigError(f"unknown knn.database {cfg.knn.database!r}; valid: budget, all")
    record = module.data_settings.get("split", {})
    source = f"checkpoint {cfg.checkpoint}"
    if record.get("eval_fold", cfg.data.fold) != cfg.data.fold:
        raise ConfigError(
            f"data.fold={cfg.data.fold}, but {source} was trained with fold {record['eval_fold']} held out: "
            f"pass data.fold={record['eval_fold']} (or knn.database=all)"
        )
    try:
        split = rebuild_split(exp.catalog, record, source)
    except DataError as e:
        raise DataError(f"{e}; knn.database=all uses every labeled training image instead") from None
    return np.sort(np.concatenate([split.labeled, split.val]))


def embed(cfg: DictConfig, module=None, exp=None):
    """Features and probabilities of every labeled and unlabeled image, streamed to an embedding store.

    Predicts through :class:`~ssl_kvasir.run.predict.Predictor` (the checkpoint's evaluation weights; device and
    autocast from ``trainer``). Memory stays bounded whatever the number of images (rows go to disk chunk by
    chunk) and a killed run resumes at its first unfinished chunk. Returns the loaded store.

    The store is keyed by the checkpoint's content (a hash of the file), not its path: a store in the default
    folder (``<output_dir>/embeddings``) made from other bytes, a checkpoint overwritten in place say, is
    computed again; one named by ``embeddings=DIR`` is refused (DataError), since it was asked for by name.
    """
    from ssl_kvasir.analysis.embeddings import (
        MANIFEST_FILE,
        EmbeddingWriter,
        load_embeddings,
        remove_store,
        store_checkpoint,
    )

    if module is None:
        module, exp = load_checkpoint_and_data(cfg)
    images = exp.catalog.images
    store = store_dir(cfg)
    digest = file_sha256(cfg.checkpoint)
    made_from = store_checkpoint(store)
    if made_from is not None and made_from != digest:
        other = f"another checkpoint ({made_from})" if made_from else "a checkpoint it does not record"
        if cfg.embeddings:
            raise DataError(
                f"embeddings={store} holds the embeddings of {other}, not of {cfg.checkpoint} ({digest}): "
                "pass another embeddings=DIR, or delete that one"
            )
        log.warning(
            "%s holds the embeddings of %s, not of %s (%s): computing them again",
            store,
            other,
            cfg.checkpoint,
            digest,
        )
        remove_store(store)
    elif (store / MANIFEST_FILE).exists():
        log.info("reusing the embeddings of %s (%s) in %s", cfg.checkpoint, digest, store)
        return load_embeddings(store, expected_paths=list(images.path))
    writer = EmbeddingWriter(
        store,
        n_rows=len(images),
        dim=module.feature_dim,
        num_classes=module.num_classes,
        dtype=cfg.embed.dtype,
        chunk_rows=cfg.embed.chunk_rows,
        checkpoint=str(Path(cfg.checkpoint).resolve()),
        checkpoint_sha256=digest,
    )
    writer.write_index(images.path, images.label, images.fold)
    rows = writer.pending_rows()
    dm = build_datamodule(cfg, exp, type(module), module.model, steps_per_epoch=1)
    dm.eval_batch_size = cfg.embed.batch_size
    predictor = Predictor.from_config(module, cfg.trainer)
    for probs, features in predictor.batches(dm, rows, features=True, what="embedding"):
        assert features is not None  # asked for with features=True
        writer.add(features, probs)
    writer.finalize(extra={"image_size": cfg.data.image_size, "precision": str(cfg.trainer.precision)})
    return load_embeddings(store, expected_paths=list(images.path))


def run_knn(cfg: DictConfig, analysis: Analysis) -> None:
    """kNN vote from the labeled training-fold images to every other image; accuracy and macro-F1 on the
    evaluation fold check the embedding."""
    from ssl_kvasir.analysis.knn import knn_classify
    from ssl_kvasir.metrics import classification_metrics

    s = analysis.store
    db = analysis.train_rows
    queries = np.setdiff1d(np.arange(len(s)), db)
    n_classes = s.probs.shape[1]
    probs = np.full((len(s), n_classes), np.nan, dtype=np.float32)
    probs[queries] = knn_classify(
        analysis.train_features,
        s.labels[db],
        np.asarray(s.features[queries], dtype=np.float32),
        k=cfg.knn.k,
        temperature=cfg.knn.temperature,
        num_classes=n_classes,
    )
    analysis.knn_probs = probs
    evaluation = analysis.eval_rows
    if len(evaluation):
        knn_pred = probs[evaluation].argmax(1)
        clf_pred = np.asarray(s.probs[evaluation]).argmax(1)
        analysis.knn_metrics = {
            "knn": classification_metrics(s.labels[evaluation], knn_pred, n_classes),
            "classifier": classification_metrics(s.labels[evaluation], clf_pred, n_classes),
            "n_eval": int(len(evaluation)),
            "n_db": int(len(db)),
            "k": cfg.knn.k,
        }


def neighbours(cfg: DictConfig, analysis: Analysis, classes, path: Path) -> Path:
    """The nearest labeled training images of each image named in ``knn.neighbours_of``, as one CSV."""
    import pandas as pd

    from ssl_kvasir.analysis.knn import nearest_labeled

    s = analysis.store
    row_of = {p: i for i, p in enumerate(s.paths)} | {Path(p).name: i for i, p in enumerate(s.paths)}
    db = analysis.train_rows
    tables = []
    for query in cfg.knn.neighbours_of:
        if query not in row_of:
            raise DataError(f"knn.neighbours_of: {query!r} is not an image of {cfg.data.root}")
        i = row_of[query]
        found = nearest_labeled(
            analysis.train_features,
            [s.paths[j] for j in db],
            s.labels[db],
            np.asarray(s.features[i], dtype=np.float32),
            k=cfg.knn.neighbours_k,
            classes=classes,
        )
        tables.append(found.assign(query=s.paths[i])[["query", *found.columns]])
    atomic_write_text(path, pd.concat(tables).to_csv(index=False))
    return path


def run_clusters(cfg: DictConfig, analysis: Analysis) -> None:
    """UMAP to 2-D (plots) and, with ``cluster.enabled``, to ``umap.cluster_dims`` (clustering), sharing
    their PCA and neighbour graph (:func:`~ssl_kvasir.analysis.cluster.analysis_projections`); HDBSCAN
    clusters and outlier scores on the latter."""
    from ssl_kvasir.analysis.cluster import analysis_projections, hdbscan_cluster

    u = cfg.umap
    projections = analysis_projections(
        analysis.store.features,
        cluster_dims=u.cluster_dims if cfg.cluster.enabled else None,
        pca_dims=u.pca_dims,
        n_neighbors=u.n_neighbors,
        min_dist=u.min_dist,
        seed=cfg.seed,
        exact=u.exact,
        backend=u.backend,
        plot_epochs=u.plot_epochs,
        cluster_epochs=u.cluster_epochs,
    )
    analysis.coords = projections.plot  # (N, 2)
    if projections.cluster is not None:
        analysis.clusters, analysis.outlier_scores = hdbscan_cluster(
            projections.cluster, cfg.cluster.min_cluster_size
        )


def pseudo_label_table(cfg: DictConfig, analysis: Analysis, classes):
    """The pseudo-label table of the unlabeled images, before selection."""
    from ssl_kvasir.pseudo_labels.table import build_pseudo_label_table

    s = analysis.store
    unl = np.flatnonzero(s.labels < 0)
    pick = lambda a: None if a is None else a[unl]  # noqa: E731
    return build_pseudo_label_table(
        [s.paths[i] for i in unl],
        np.asarray(s.probs[unl]),
        classes,
        knn_probs=pick(analysis.knn_probs),
        clusters=pick(analysis.clusters),
        outlier_scores=pick(analysis.outlier_scores),
        checkpoint=str(cfg.checkpoint),
    ), unl


def review_order(cfg: DictConfig, analysis: Analysis, table, rows: np.ndarray):
    """``table``'s rows in review order (``review.*`` keys: :func:`ssl_kvasir.analysis.priority.review_order`)
    and their priorities, in that order; ``rows`` are the table's rows of the embedding store."""
    from ssl_kvasir.analysis.priority import review_order as order_rows

    r = cfg.review
    order, scores = order_rows(
        table,
        analysis.store.features[rows],
        margin_weight=r.margin_weight,
        disagreement_weight=r.disagreement_weight,
        outlier_weight=r.outlier_weight,
        coverage=r.coverage,
        neighbours=r.neighbours,
        candidates=r.candidates,
    )
    return table.iloc[order], scores[order]


def select(cfg: DictConfig, analysis: Analysis, classes):
    """The pseudo-label table of the unlabeled images after ``select.*`` (in review order with
    ``select.order=review``), and the embedding-store row of each of its rows."""
    from ssl_kvasir.pseudo_labels.table import select_pseudo_labels

    table, unl = pseudo_label_table(cfg, analysis, classes)
    kept = select_pseudo_labels(
        table,
        min_confidence=cfg.select.min_confidence,
        top_k_per_class=cfg.select.top_k_per_class,
        require_agreement=cfg.select.require_agreement,
    )
    if cfg.select.order == "review":
        kept, _ = review_order(cfg, analysis, kept, unl[kept.index.to_numpy()])
    return kept, unl[kept.index.to_numpy()]


def export(cfg: DictConfig, analysis: Analysis, classes) -> Path:
    """Select and write the pseudo-label file (atomically)."""
    from ssl_kvasir.pseudo_labels.table import write_pseudo_labels

    kept, rows = select(cfg, analysis, classes)
    suffix = ".json" if cfg.format == "label-studio" else ".csv"
    output = Path(cfg.output) if cfg.output else _out_dir(cfg) / f"pseudo_labels{suffix}"
    probs = np.asarray(analysis.store.probs[rows])
    write_pseudo_labels(
        kept,
        output,
        format=cfg.format,
        probs=probs,
        classes=classes,
        image_prefix=cfg.label_studio.image_prefix,
    )
    n_pool = int((analysis.store.labels < 0).sum())
    log.info("%d of %d unlabeled images exported to %s", len(kept), n_pool, output)
    return output


def composition(cfg: DictConfig, analysis: Analysis, classes, out: Path) -> dict[str, Path]:
    """The paper's Fig. 9 from the classifier, from kNN and from external prediction files, with agreement."""
    from ssl_kvasir.analysis.composition import write_composition_report
    from ssl_kvasir.pseudo_labels.table import write_authors_predictions

    s = analysis.store
    unl = np.flatnonzero(s.labels < 0)
    names = [Path(s.paths[i]).name for i in unl]
    sources = [out / "predictions" / "classifier.csv"]
    write_authors_predictions(sources[0], names, np.asarray(s.probs[unl]), classes=classes)
    if analysis.knn_probs is not None:
        sources.append(out / "predictions" / "knn.csv")
        write_authors_predictions(sources[1], names, analysis.knn_probs[unl], classes=classes)
    sources += [Path(p) for p in cfg.predictions]
    report = write_composition_report(sources, out / "composition", classes)
    return {f"composition {k}": Path(v) for k, v in report.files.items()}


def prior_comparison(module, analysis: Analysis, classes, path: Path) -> dict | None:
    """The unlabeled class prior a method estimated while training (ACR, SimPro) beside the composition of
    the unlabeled images as its classifier predicts them, as shares, their total-variation distance and a
    bar chart at ``path``. None for a method that estimates no prior."""
    import pandas as pd

    from ssl_kvasir.analysis.plots import plot_composition

    estimated = module.unlabeled_prior
    if not estimated:
        return None
    s = analysis.store
    unl = np.flatnonzero(s.labels < 0)
    if not len(unl):
        return None
    names = classes.names
    counts = np.bincount(np.asarray(s.probs[unl]).argmax(1), minlength=len(names))  # (C,)
    predicted = counts / counts.sum()  # (C,)
    prior = np.array([estimated[n] for n in names], dtype=np.float64)  # (C,)
    table = pd.DataFrame(
        {
            "class": names,
            "letter": classes.letters,
            "estimated prior": prior,
            "predicted composition": predicted,
        }
    )
    plot_composition(
        table,
        path,
        ylabel="share of the unlabeled images",
        title="Unlabeled class prior estimated in training vs the classifier's predicted composition",
    )
    return {
        "estimated": {n: float(p) for n, p in zip(names, prior, strict=True)},
        "predicted": {n: float(p) for n, p in zip(names, predicted, strict=True)},
        "total_variation": float(0.5 * np.abs(prior - predicted).sum()),
        "n_unlabeled": int(len(unl)),
    }


def analyze(cfg: DictConfig) -> Analysis:
    """Embeddings, kNN, UMAP + clusters, composition, plots and the pseudo-label export, in one go."""
    from ssl_kvasir.analysis.cluster import cluster_purity
    from ssl_kvasir.analysis.plots import plot_knn_confusion, plot_umap
    from ssl_kvasir.run.tracking import log_analysis

    module, exp = load_checkpoint_and_data(cfg)
    classes = exp.catalog.classes
    out = _out_dir(cfg)
    analysis = Analysis(
        store=embed(cfg, module, exp),
        eval_fold=cfg.data.fold,
        database_rows=knn_database(cfg, module, exp),
    )
    analysis.outputs["embeddings"] = store_dir(cfg)
    run_knn(cfg, analysis)
    if cfg.knn.neighbours_of:
        analysis.outputs["nearest labeled images"] = neighbours(
            cfg, analysis, classes, out / "neighbours.csv"
        )
    run_clusters(cfg, analysis)
    assert analysis.knn_probs is not None and analysis.coords is not None  # set by run_knn and run_clusters
    s = analysis.store
    predicted = np.where(s.labels >= 0, s.labels, np.asarray(s.probs).argmax(1))
    analysis.outputs["umap plot"] = plot_umap(
        analysis.coords,
        predicted,
        classes,
        out / "umap.png",
        is_labeled=s.labels >= 0,
        title="UMAP of the embeddings",
    )
    evaluation = analysis.eval_rows
    if len(evaluation):
        analysis.outputs["knn confusion"] = plot_knn_confusion(
            s.labels[evaluation],
            analysis.knn_probs[evaluation].argmax(1),
            classes,
            out / "knn_confusion.png",
            title=f"kNN (k={cfg.knn.k}) on evaluation fold {analysis.eval_fold}",
        )
    if analysis.clusters is not None:
        unl = s.labels < 0
        purity = {
            "classifier": cluster_purity(analysis.clusters[unl], predicted[unl], len(classes)),
            "knn": cluster_purity(analysis.clusters[unl], analysis.knn_probs[unl].argmax(1), len(classes)),
        }
        for name, table in purity.items():
            table = table.assign(
                dominant_class=[classes[c].folder if c >= 0 else "" for c in table.dominant_class]
            )
            path = out / f"clusters_vs_{name}.csv"
            atomic_write_text(path, table.to_csv(index=False))
            analysis.outputs[f"cluster purity ({name})"] = path
    analysis.outputs.update(composition(cfg, analysis, classes, out))
    prior = prior_comparison(module, analysis, classes, out / "unlabeled_prior.png")
    if prior is not None:
        analysis.outputs["unlabeled prior plot"] = out / "unlabeled_prior.png"
    analysis.outputs["pseudo-labels"] = export(cfg, analysis, classes)
    summary = out / "analysis.json"
    atomic_write_json(
        summary,
        {
            "checkpoint": str(cfg.checkpoint),
            "checkpoint_sha256": s.meta["checkpoint_sha256"],
            "eval_fold": analysis.eval_fold,
            "n_images": len(s),
            "n_unlabeled": int((s.labels < 0).sum()),
            "knn_check": analysis.knn_metrics,
            "knn_database": cfg.knn.database,
            "knn_database_images": int(len(analysis.train_rows)),
            "n_clusters": int(analysis.clusters.max() + 1) if analysis.clusters is not None else None,
            "unlabeled_prior": prior,
            "outputs": {k: str(v) for k, v in analysis.outputs.items()},
        },
    )
    analysis.outputs["summary"] = summary
    # Plots, composition tables and the pseudo-label summary: into the active W&B run, or into a run of the
    # analysis's own when the checkpoint's run logged to W&B.
    log_analysis(cfg.checkpoint, out, analysis.outputs, analysis.knn_metrics)
    return analysis


def export_pseudo_labels(cfg: DictConfig) -> Path:
    """Embeddings (reused when present), kNN (and clusters with ``cluster.export``), then the selected
    pseudo-label CSV."""
    module, exp = load_checkpoint_and_data(cfg)
    analysis = Analysis(
        store=embed(cfg, module, exp),
        eval_fold=cfg.data.fold,
        database_rows=knn_database(cfg, module, exp),
    )
    run_knn(cfg, analysis)
    if cfg.cluster.export:
        run_clusters(cfg, analysis)
    return export(cfg, analysis, exp.catalog.classes)


def summary_lines(analysis: Analysis) -> list[str]:
    lines = []
    check = analysis.knn_metrics
    if check:
        lines.append(
            f"evaluation fold {analysis.eval_fold} ({check['n_eval']} images): kNN accuracy "
            f"{check['knn']['accuracy']:.4f}, macro-F1 {check['knn']['macro_f1']:.4f}; classifier accuracy "
            f"{check['classifier']['accuracy']:.4f}, macro-F1 {check['classifier']['macro_f1']:.4f}"
        )
    lines += [f"{name:>28}: {path}" for name, path in analysis.outputs.items()]
    return lines
