"""End-to-end analysis of a trained checkpoint: embed, kNN, clusters, composition, pseudo-label export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny, training_counts

from ssl_kvasir.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(synth_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    assert main(["fit", f"output_dir={out}", *data, *tiny()]) == 0
    results = json.loads((out / "results.json").read_text())
    results["checkpoint"] = str(out / results["checkpoint"])  # results.json names it relative to the run
    return results, data


def _analysis_args(trained, out, *extra):
    results, data = trained
    return [
        f"checkpoint={results['checkpoint']}",
        f"output_dir={out}",
        *data,
        "data.num_workers=0",
        "umap.n_neighbors=5",
        "umap.exact=true",  # one thread, seeded: the clusters are the same on every run
        "cluster.min_cluster_size=5",
        *extra,
    ]


def test_analyze_end_to_end(trained, synth_archive, tmp_path, capsys):
    results, _ = trained
    out = tmp_path / "analysis"
    from ssl_kvasir.data.archive import load_catalog

    some = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv").unlabeled.path.iloc[0]
    assert (
        main(["analyze", *_analysis_args(trained, out, f"knn.neighbours_of=[{some}]", "knn.neighbours_k=3")])
        == 0
    )
    printed = capsys.readouterr().out
    summary = json.loads((out / "analysis.json").read_text())
    for path in summary["outputs"].values():
        assert Path(path).exists()
        assert str(path) in printed
    # The classifier view equals the fit's own test metrics: same checkpoint, same weights, same images.
    assert summary["knn_check"]["classifier"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert summary["knn_check"]["n_eval"] == results["n_test"]

    from ssl_kvasir.analysis.embeddings import load_embeddings

    store = load_embeddings(out / "embeddings")
    unl = store.labels < 0
    predicted = np.asarray(store.probs)[unl].argmax(1)
    # Composition counts equal a naive count of the classifier's predictions.
    comp = pd.read_csv(out / "composition" / "composition.csv")
    naive = [int((predicted == c).sum()) for c in range(23)]
    assert comp["classifier"].tolist() == naive
    # One pseudo-label row per unlabeled image, tied to its file and with every view filled in.
    table = pd.read_csv(out / "pseudo_labels.csv")
    assert len(table) == unl.sum() == 60
    assert set(table.path) == {p for p, u in zip(store.paths, unl, strict=True) if u}
    assert table.knn_class.notna().all() and table.cluster.notna().all()
    by_path = dict(zip(table.path, table.paper_index, strict=True))
    assert [by_path[store.paths[i]] for i in np.flatnonzero(unl)] == predicted.tolist()
    # The nearest labeled images of one unlabeled image, most similar first, all from the training fold.
    near = pd.read_csv(out / "neighbours.csv")
    assert near["query"].eq(some).all() and len(near) == 3
    assert near.similarity.is_monotonic_decreasing
    folds = dict(zip(store.paths, store.folds, strict=True))
    assert all(folds[p] not in (-1, summary["eval_fold"]) for p in near.path)


def test_export_in_authors_format_with_selection(trained, tmp_path):
    out = tmp_path / "export"
    target = out / "pl.csv"
    assert (
        main(
            [
                "export-pseudo-labels",
                *_analysis_args(
                    trained,
                    out,
                    f"output={target}",
                    "format=authors",
                    "select.top_k_per_class=2",
                    "cluster.enabled=false",
                ),
            ]
        )
        == 0
    )
    lines = target.read_text().splitlines()
    assert lines[0] == "filename,predicted-label," + ",".join("ABCDEFGHIJKLMNOPQRSTUVW")
    rows = [line.split(",") for line in lines[1:]]
    assert 1 <= len(rows) <= 2 * 23
    assert all(len(r) == 25 and all(len(p.split(".")[1]) == 3 for p in r[2:]) for r in rows)
    assert max(np.bincount([int(r[1]) for r in rows])) <= 2


def test_archive_changed_since_embedding(trained, synth_archive, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", *_analysis_args(trained, out)]) == 0
    moved = tmp_path / "archive"
    shutil.copytree(synth_archive, moved)
    extra = next((moved / "unlabeled-images" / "images").iterdir())
    shutil.copy(extra, extra.with_name("new-image.jpg"))
    args = [a.replace(str(synth_archive), str(moved)) for a in _analysis_args(trained, out)]
    assert main(["embed", *args]) == 2
    assert "1 paths added" in capsys.readouterr().err


def test_bad_analysis_requests(trained, tmp_path, capsys):
    assert main(["export-pseudo-labels", *_analysis_args(trained, tmp_path / "k", "knn.k=100000")]) == 2
    assert "k=100000" in capsys.readouterr().err
    # UMAP's keys are checked before anything is loaded: one line naming each bad key.
    bad = ["umap.backend=gpu", "umap.pca_dims=0", "umap.cluster_epochs=0"]
    assert main(["analyze", *_analysis_args(trained, tmp_path / "u", *bad)]) == 2
    err = capsys.readouterr().err
    assert "umap.backend" in err and "umap.pca_dims" in err and "umap.cluster_epochs" in err
    assert not (tmp_path / "u").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "ok"
    code = main(
        [
            "export-pseudo-labels",
            *_analysis_args(trained, out, f"output={blocker / 'pl.csv'}", "cluster.enabled=false"),
        ]
    )
    assert code == 2
    assert str(blocker / "pl.csv") in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def _shift_classes(checkpoint: Path) -> None:
    """Overwrite ``checkpoint`` in place with a model whose class scores are rolled by one: every weight and
    bias of a 23-class output layer (the model's and the EMA's), so each prediction becomes the next class."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    rolled = 0
    for key, value in state["state_dict"].items():
        if value.shape[:1] == (23,) and value.ndim in (1, 2) and value.is_floating_point():
            state["state_dict"][key] = torch.roll(value, 1, dims=0)
            rolled += 1
    assert rolled >= 2  # at least one weight and its bias
    torch.save(state, checkpoint)


def test_an_overwritten_checkpoint_is_embedded_again(trained, tmp_path, capsys):
    """The store is keyed by the checkpoint's content: the same path with other bytes is computed again (it
    used to say "reusing the embeddings" and export the old model's classes); an embeddings=DIR of another
    checkpoint is refused."""
    from ssl_kvasir.files import file_sha256

    results, data = trained
    checkpoint = tmp_path / "model.ckpt"
    shutil.copy(results["checkpoint"], checkpoint)
    out = tmp_path / "export"
    args = [
        f"checkpoint={checkpoint}",
        f"output_dir={out}",
        *data,
        "data.num_workers=0",
        "cluster.enabled=false",
        "format=authors",
    ]
    assert main(["export-pseudo-labels", *args]) == 0
    before = pd.read_csv(out / "pseudo_labels.csv")["predicted-label"].to_numpy()
    old_store = tmp_path / "old_store"
    shutil.copytree(out / "embeddings", old_store)

    _shift_classes(checkpoint)
    capsys.readouterr()
    assert main(["export-pseudo-labels", *args]) == 0
    assert "computing them again" in capsys.readouterr().err
    after = pd.read_csv(out / "pseudo_labels.csv")["predicted-label"].to_numpy()
    assert (after == (before + 1) % 23).all()
    manifest = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert manifest["checkpoint_sha256"] == file_sha256(checkpoint)
    # Run again: now the store is the checkpoint's own and is reused.
    assert main(["export-pseudo-labels", *args]) == 0
    assert "reusing the embeddings" in capsys.readouterr().err

    assert main(["export-pseudo-labels", *args, f"embeddings={old_store}"]) == 2
    err = capsys.readouterr().err
    assert f"embeddings={old_store} holds the embeddings of another checkpoint" in err


def test_embedding_without_a_terminal_prints_progress_lines(trained, tmp_path, capsys):
    """With stderr not a terminal (here captured), the embedding says how far it is every 10 % or 30 s, with
    the time left: on the full archive it used to print nothing for 6.7 minutes."""
    import re

    assert main(["embed", *_analysis_args(trained, tmp_path / "e", "embed.batch_size=16")]) == 0
    err = capsys.readouterr().err
    lines = re.findall(r"embedding: [\d,]+ of 198 images \(\d+ %\), [\d,]+ images/s, about .* left", err)
    assert len(lines) >= 5, err  # 13 batches of 16: a line at each 10 % they cross
    assert re.search(r"embedding: 198 images in [\d.]+ s", err)


def test_export_on_a_full_disk_is_one_line_naming_the_file(trained, tmp_path):
    """export-pseudo-labels into a folder on a disk too small for it: exit 1 (the machine, not the input),
    one line naming the file it could not write; the embedding store never dies by SIGBUS."""
    import sys

    from helpers import on_a_small_disk

    disk = tmp_path / "small_disk"
    argv = [sys.executable, "-m", "ssl_kvasir.cli", "export-pseudo-labels"]
    args = _analysis_args(trained, disk / "out", "cluster.enabled=false")
    proc = on_a_small_disk(disk, "24k", [*argv, *args])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ssl-kvasir export-pseudo-labels:")]
    assert f"{disk}/out/" in line and "[Errno 28]" in line, line


@pytest.mark.slow
def test_knn_database_is_the_checkpoints_own_labeled_images(one_percent_run, imbalanced_archive, tmp_path):
    from ssl_kvasir.config import compose
    from ssl_kvasir.data.splits import make_split
    from ssl_kvasir.errors import ConfigError
    from ssl_kvasir.names import LabelBudget
    from ssl_kvasir.run import analyze as analysis

    data = [f"data.root={imbalanced_archive}", f"data.split_file={imbalanced_archive / '2_fold_split.csv'}"]
    base = [
        f"checkpoint={one_percent_run['checkpoint']}",
        f"output_dir={tmp_path}",
        "data.fold=1",
        "data.num_workers=0",
        *data,
    ]
    cfg = compose("analyze", base)
    module, exp = analysis.load_checkpoint_and_data(cfg)
    rows = analysis.knn_database(cfg, module, exp)
    # The rows a user with the 1 % budget labeled, cut independently of the checkpoint.
    own = make_split(exp.catalog, 1, budget=LabelBudget.from_settings(0.01, None), seed=0)
    assert rows.tolist() == sorted([*own.labeled, *own.val]) and len(rows) == one_percent_run["n_labels_used"]
    cfg_all = compose("analyze", [*base, "knn.database=all", "data.image_size=32"])
    assert analysis.knn_database(cfg_all, module, exp) is None
    store = analysis.embed(cfg_all, module, exp)
    everything = analysis.Analysis(store=store, eval_fold=1).train_rows
    assert len(everything) == training_counts(imbalanced_archive, 1).sum() > len(rows)
    budget = analysis.Analysis(store=store, eval_fold=1, database_rows=rows)
    analysis.run_knn(cfg, budget)
    assert budget.knn_metrics["n_db"] == 27
    # The vote never comes from a labeled image outside the budget: those rows are queries, not neighbours.
    assert not np.isnan(budget.knn_probs[np.setdiff1d(everything, rows)]).any()
    with pytest.raises(
        ConfigError, match=r"data.fold=0, but checkpoint .* fold 1 held out: pass data.fold=1"
    ):
        analysis.knn_database(compose("analyze", [*base, "data.fold=0"]), module, exp)
