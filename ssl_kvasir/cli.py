"""The ``ssl-kvasir`` command: parses arguments, composes configs and calls the library.

Two kinds of sub-commands:
- plain ones (``check``, ``synth``, ``prepare``, ...) take ``--flags``;
- training and analysis ones (``fit``, ``evaluate``, ...) take Hydra overrides ``key=value`` on the configs
  under ``configs/`` (struct mode: a key that does not exist is an error).
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ssl_kvasir.console import quiet_console, setup_logging
from ssl_kvasir.errors import SslKvasirError
from ssl_kvasir.files import DISK_ERRNOS
from ssl_kvasir.run.folder import RunFolder
from ssl_kvasir.run.guard import FitInterrupted, Requeued


def _check(argv: list[str]) -> int:
    import os

    from ssl_kvasir.data.archive import inspect_images, load_catalog

    p = argparse.ArgumentParser(
        prog="ssl-kvasir check",
        description="Validate a downloaded archive: layout, split file, folds, and every image decoded. "
        "Exit status 0: no problems; 1: problems found (each listed); 2: the archive cannot be read.",
    )
    p.add_argument("--root", type=Path, required=True, help="archive root (holds labeled-images/)")
    p.add_argument("--split-file", type=Path, help="official split file (file-name;class-name;split-index)")
    p.add_argument("--generate-folds", type=int, help="check with N generated stratified folds instead")
    p.add_argument("--source", default="hyperkvasir", choices=["hyperkvasir", "folder"])
    p.add_argument("--unlabeled-root", type=Path, help="unlabeled images of a folder source")
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="structural check of the images only (headers, sizes, end markers), not a full decode",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes decoding images (default: all cores)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    setup_logging()  # the progress lines of a long check, when stderr is not a terminal
    catalog = load_catalog(
        a.root,
        source=a.source,
        split_file=a.split_file,
        generate_folds=a.generate_folds,
        unlabeled_root=a.unlabeled_root,
        strict=False,
    )
    bad = inspect_images(
        catalog.root,
        list(catalog.images.path),
        decode=not a.no_decode,
        workers=a.workers,
        progress=not (a.no_progress or a.json),
    )
    catalog.problems += list(bad.values())
    summary = catalog.summary() | {"unusable_images": list(bad)}
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_check(summary)
    return 1 if summary["problems"] else 0


def _print_check(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"{summary['root']}: {summary['labeled']} labeled, {summary['unlabeled']} unlabeled images"
    )
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, n in summary["classes"].items():
        table.add_row(name, str(n))
    console.print(table)
    console.print("folds: " + ", ".join(f"{k}: {n}" for k, n in summary["folds"].items()))
    if summary["problems"]:
        console.print(f"[red]{len(summary['problems'])} problems:[/red]")
        for problem in summary["problems"]:
            # Unwrapped: whole paths, one problem per line, greppable.
            console.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found[/green]")


def _baselines(argv: list[str]) -> int:
    from ssl_kvasir.study.baselines import split_file_baselines
    from ssl_kvasir.study.table3 import TABLE_METRICS, baseline_rows, render_markdown

    p = argparse.ArgumentParser(
        prog="ssl-kvasir baselines",
        description="The paper's majority-class and random-guessing rows from a split file.",
    )
    p.add_argument(
        "--split-file",
        type=Path,
        required=True,
        help="official split file (file-name;class-name;split-index)",
    )
    p.add_argument(
        "--seeds", type=int, default=100, help="repeats of random guessing to average (default 100)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
    baselines = split_file_baselines(a.split_file, seed=a.seed, n_repeats=a.seeds)
    rows = baseline_rows(baselines)
    if a.json:
        out = {
            r.system: {
                "ours": r.ours,
                "std": None if b.std is None else {k: b.std[k] for k in TABLE_METRICS},
                "paper": r.paper,
                "diff": r.diff,
                "repeats": r.n_runs,
                "folds": list(r.folds),
            }
            for b, r in zip(baselines, rows, strict=True)
        }
        print(json.dumps({"split_file": str(a.split_file), "seed": a.seed, "rows": out}, indent=2))
    else:
        print(render_markdown(rows, title=f"Baselines of {a.split_file} beside the paper's"), end="")
    return 0


def _report(argv: list[str]) -> int:
    from ssl_kvasir.study.report import write_report

    p = argparse.ArgumentParser(
        prog="ssl-kvasir report",
        description="Average runs per system over folds; write Table 3 beside the paper's.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folder, results.json, or a folder above runs",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for table3.csv, table3.md, confusion_<system>.png"
    )
    p.add_argument(
        "--split-file", type=Path, help="add the majority-class and random-guessing rows from this split file"
    )
    p.add_argument(
        "--seeds", type=int, default=100, help="repeats of random guessing to average (default 100)"
    )
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be at least 1")
    write_report(a.runs, a.out, split_file=a.split_file, n_random_repeats=a.seeds)
    print(
        (a.out / "table3.md").read_text(encoding="utf-8"), end=""
    )  # Table 3, then the rarest classes' recall
    print(
        f"wrote {a.out / 'table3.csv'}, {a.out / 'table3.md'}, {a.out / 'rare_classes.csv'} and the confusion "
        f"matrices in {a.out}"
    )
    return 0


def _synth(argv: list[str]) -> int:
    from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
    from ssl_kvasir.data.synth import make_synthetic_archive

    p = argparse.ArgumentParser(
        prog="ssl-kvasir synth",
        description="Write a synthetic archive in the HyperKvasir layout (for tests and demos).",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="archive root to create (must not hold an archive)"
    )
    p.add_argument("--per-class", type=int, required=True, help="labeled images per class")
    p.add_argument("--unlabeled", type=int, required=True, help="number of unlabeled images")
    p.add_argument("--seed", type=int, required=True, help="seed of names, sizes, pictures and folds")
    p.add_argument("--folds", type=int, default=2, help="folds in the split file (default 2)")
    a = p.parse_args(argv)
    root = make_synthetic_archive(
        a.out, per_class=a.per_class, unlabeled=a.unlabeled, seed=a.seed, n_folds=a.folds
    )
    print(f"wrote {root}:")
    print(f"  labeled-images/: {a.per_class} images in each of {len(HYPERKVASIR_CLASSES)} classes")
    print(f"  unlabeled-images/images/: {a.unlabeled} images")
    print(f"  split file: {root / f'{a.folds}_fold_split.csv'} ({a.folds} folds)")
    return 0


def _prepare(argv: list[str]) -> int:
    import os

    from ssl_kvasir.data.archive import list_images
    from ssl_kvasir.data.cache import prepare_cache

    p = argparse.ArgumentParser(
        prog="ssl-kvasir prepare",
        description="Cache every labeled and unlabeled image, shrunk to --size and re-encoded, for fast training.",
    )
    p.add_argument(
        "--root", type=Path, required=True, help="archive root (or labeled class folders for --source folder)"
    )
    p.add_argument("--cache", type=Path, required=True, help="cache folder to create or complete")
    p.add_argument(
        "--size", type=int, default=256, help="shorter side of the cached images in pixels (default 256)"
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)"
    )
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the cached images (default 90)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--split-file", type=Path, help="official split file (not needed to build a cache)")
    folds.add_argument(
        "--generate-folds", type=int, help="generated stratified folds (not needed to build a cache)"
    )
    p.add_argument("--source", default="hyperkvasir", choices=["hyperkvasir", "folder"])
    p.add_argument("--unlabeled-root", type=Path, help="unlabeled images of a folder source")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    a = p.parse_args(argv)
    setup_logging()  # the progress lines of a long prepare, when stderr is not a terminal
    root, images, problems = list_images(
        a.root,
        source=a.source,
        split_file=a.split_file,
        generate_folds=a.generate_folds,
        unlabeled_root=a.unlabeled_root,
    )
    for problem in problems:
        print(f"note: {problem}")
    n_labeled, n_unlabeled = int((images.label >= 0).sum()), int((images.label < 0).sum())
    print(f"{root}: {n_labeled} labeled and {n_unlabeled} unlabeled images")
    report = prepare_cache(
        root,
        list(images.path),
        a.cache,
        size=a.size,
        workers=a.workers,
        shard_size=a.shard_size,
        progress=not a.no_progress,
        quality=a.quality,
    )
    print(
        f"cache {report.cache_dir} at {report.size} px: {report.n_cached} of {report.n_requested} images cached "
        f"({report.n_new} encoded now, {report.shards_built} shards built, {report.shards_reused} reused) "
        f"in {report.elapsed_s:.1f} s"
    )
    if report.skipped:
        print(f"{len(report.skipped)} files skipped:")
        for path, reason in report.skipped.items():
            print(f"  - {path}: {reason}")
    return 0


def _hydra_overrides(argv: list[str], prog: str, config: str, example: str) -> list[str]:
    if any(a in ("-h", "--help") for a in argv):
        from ssl_kvasir.config import config_dir

        print(
            f"usage: {prog} KEY=VALUE ...\n\nHydra overrides on {config_dir()}/{config}.yaml and its groups "
            f"(data, method, backbone, trainer, logger), e.g. {example}",
            file=sys.stderr,
        )
        raise SystemExit(0)
    return argv


def _fit(argv: list[str]) -> int:
    from ssl_kvasir.config import check_inputs, compose, validate

    example = "method=fixmatch data.root=DIR data.fold=0 data.label_fraction=0.1 backbone.name=resnet18 output_dir=DIR"
    cfg = compose("fit", _hydra_overrides(argv, "ssl-kvasir fit", "fit", example))
    validate(cfg)  # before the import below, which imports torch: a bad value is refused at once
    check_inputs(cfg, ("output_dir", "data.root"))
    from ssl_kvasir.run.train import fit

    setup_logging()
    results = fit(cfg)
    _print_metrics(results, RunFolder(Path(cfg.output_dir)).results)
    return 0


def _evaluate(argv: list[str]) -> int:
    from ssl_kvasir.config import CHECKPOINT_RULES, check_inputs, compose, validate

    # configs/evaluate.yaml: what the checkpoint was trained with is null there, "the checkpoint's".
    example = "checkpoint=RUN/checkpoints/best.ckpt data.root=DIR data.split_file=FILE output_dir=DIR (the fold, image size and label budget are the checkpoint's)"
    cfg = compose("evaluate", _hydra_overrides(argv, "ssl-kvasir evaluate", "evaluate", example))
    validate(cfg, CHECKPOINT_RULES)
    check_inputs(cfg, ("checkpoint", "output_dir", "data.root"))
    from ssl_kvasir.run.train import evaluate

    setup_logging()
    results = evaluate(cfg)
    _print_metrics(results, RunFolder(Path(cfg.output_dir)).evaluation)
    return 0


def _analysis_command(step: str):
    """``embed``, ``analyze``, ``export-pseudo-labels`` or ``review``: Hydra overrides on configs/analyze.yaml."""

    def run(argv: list[str]) -> int:
        from ssl_kvasir.config import CHECKPOINT_RULES, check_inputs, compose, validate

        if any(a in ("-h", "--help") for a in argv):
            print(
                f"usage: ssl-kvasir {step} checkpoint=CKPT data.root=DIR data.split_file=F output_dir=DIR "
                "[KEY=VALUE ...] (keys: configs/analyze.yaml)",
                file=sys.stderr,
            )
            return 0
        cfg = compose("analyze", argv)
        validate(cfg, CHECKPOINT_RULES)
        check_inputs(cfg, ("checkpoint", "data.root"))
        from ssl_kvasir.run import analyze

        setup_logging()
        if step == "embed":
            store = analyze.embed(cfg)
            print(f"{len(store)} images embedded -> {analyze.store_dir(cfg)}")
        elif step == "analyze":
            result = analyze.analyze(cfg)
            print("\n".join(analyze.summary_lines(result)))
        elif step == "review":
            from ssl_kvasir.run.review import review

            print(f"review page -> {review(cfg)}")
        else:
            print(f"pseudo-labels -> {analyze.export_pseudo_labels(cfg)}")
        return 0

    return run


def _label_issues(argv: list[str]) -> int:
    from ssl_kvasir.config import check_inputs, compose, validate

    example = "data.root=DIR data.split_file=FILE data.fold=0 output_dir=DIR label_issues.folds=5 (trains k networks: method, backbone, trainer as for fit)"
    cfg = compose("label_issues", _hydra_overrides(argv, "ssl-kvasir label-issues", "label_issues", example))
    validate(cfg)
    check_inputs(cfg, ("output_dir", "data.root"))
    from ssl_kvasir.run.label_issues import label_issues

    setup_logging()
    path, flagged, checked = label_issues(cfg)
    print(f"{flagged} of {checked} labeled training images flagged -> {path}")
    return 0


def _print_metrics(results: dict, record: Path) -> None:
    """One line of the record's figures (those it has), and where the record is."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from ssl_kvasir.names import METRIC_LABELS

    if getattr(rank_zero_only, "rank", 0) != 0:
        return  # under DDP every process returns the results; one prints them
    m = results["metrics"]
    shown = "  ".join(
        f"{METRIC_LABELS[k]} {m[k]:.4f}"
        for k in ("mcc", "macro_f1", "micro_f1", "balanced_accuracy")
        if k in m
    )
    weights = f", {results['metrics_weights']} weights" if results.get("metrics_weights") else ""
    print(
        f"{results['method']} {results['backbone']} fold {results['fold']} ({results['n_labeled']} labeled"
        f"{weights}): {shown}\n-> {record}"
    )


def _composition(argv: list[str]) -> int:
    from ssl_kvasir.analysis.composition import write_composition_report

    p = argparse.ArgumentParser(
        prog="ssl-kvasir composition",
        description="Count predicted classes per prediction file (authors' or ssl_kvasir format) and compare them.",
    )
    p.add_argument(
        "--predictions", type=Path, nargs="+", required=True, help="prediction files, named by file stem"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    a = p.parse_args(argv)
    report = write_composition_report(a.predictions, a.out)
    if report.agreement is not None:
        for r in report.agreement.itertuples():
            print(f"{r.a} vs {r.b}: {r.n_agree} of {r.n_common} shared images agree ({r.rate:.1%})")
    for path in report.files.values():
        print(f"-> {path}")
    return 0


def _curves(argv: list[str]) -> int:
    from ssl_kvasir.run.tracking import open_curves_run
    from ssl_kvasir.study.curves import CURVE_METRICS, load_runs, wandb_project, write_curves

    p = argparse.ArgumentParser(
        prog="ssl-kvasir curves",
        description="Label-efficiency curves: mean, std and n over folds and seeds of every run's results.json, "
        "per method and label budget, as CSV, Markdown and a PNG beside the paper's DenseNet-161.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="sweep folder(s), searched recursively")
    p.add_argument("--out", type=Path, required=True, help="folder for label_efficiency.csv, .md and .png")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(CURVE_METRICS),
        metavar="METRIC",
        help=f"metrics of results.json to summarize (default: {' '.join(CURVE_METRICS)})",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table and plot to a W&B run in the sweep's project (offline unless W&B is configured)",
    )
    p.add_argument("--wandb-project", help="W&B project for --wandb (default: the one the runs logged to)")
    a = p.parse_args(argv)
    run, logged = None, ""
    if a.wandb:
        project, entity = wandb_project(load_runs(a.runs, a.metrics), a.wandb_project)
        run = open_curves_run(project, entity, a.out)
        logged = f"-> W&B run {run.name} in project {project} ({run.settings.mode}): label_efficiency/table, /curves"
    try:
        report = write_curves(a.runs, a.out, metrics=a.metrics, wandb_run=run)
    finally:
        if run is not None:
            run.finish()  # written to disk before the command returns (main: release_tracking)
    print(report.markdown, end="")
    print("\n".join(f"-> {path}" for path in report.files.values()))
    if logged:
        print(logged)
    return 0


def _status(argv: list[str]) -> int:
    from ssl_kvasir.study.status import format_status, sweep_status

    p = argparse.ArgumentParser(
        prog="ssl-kvasir status",
        description="Where each point of a sweep stands: done, running (job, step, last checkpoint), queued, "
        "failed (last log line) or missing.",
    )
    p.add_argument("root", type=Path, metavar="DIR", help="the sweep folder (make pretrain's OUT)")
    a = p.parse_args(argv)
    if not a.root.is_dir():
        raise SslKvasirError(f"{a.root} is not a folder")
    print("\n".join(format_status(sweep_status(a.root), a.root)))
    return 0


def _weights(argv: list[str]) -> int:
    from ssl_kvasir.models.weights import fetch_weights, weights_override

    p = argparse.ArgumentParser(
        prog="ssl-kvasir weights",
        description="Fetch timm's ImageNet weights once (where the internet is reachable) into a file that "
        "backbone.weights= loads offline.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    fetch = sub.add_parser("fetch", help="download NAME's weights into DIR/<NAME>.pth")
    fetch.add_argument("name", metavar="NAME", help="timm model name, or an ensemble joined by '+'")
    fetch.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the weight files")
    a = p.parse_args(argv)
    files = fetch_weights(a.name, a.out)
    print("\n".join(f"-> {f}" for f in files))
    print(f"train with: backbone.name={a.name} {weights_override(files)}")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "fit": (_fit, "train a method (Hydra overrides: method=... data.root=... output_dir=...)"),
    "evaluate": (_evaluate, "re-evaluate a checkpoint on the evaluation fold (checkpoint=CKPT ...)"),
    "embed": (_analysis_command("embed"), "features and probabilities of every image, streamed to disk"),
    "analyze": (
        _analysis_command("analyze"),
        "embeddings, kNN, UMAP clusters, composition, pseudo-label export",
    ),
    "export-pseudo-labels": (
        _analysis_command("export"),
        "pseudo-label CSV of the unlabeled images (output=FILE.csv)",
    ),
    "review": (
        _analysis_command("review"),
        "a static HTML page to review pseudo-labels and download the reviewed CSV",
    ),
    "label-issues": (
        _label_issues,
        "suspect labels of the labeled training fold (cleanlab on k-fold out-of-fold probabilities)",
    ),
    "check": (_check, "validate a downloaded archive and its split file"),
    "synth": (_synth, "write a synthetic archive in the HyperKvasir layout"),
    "prepare": (_prepare, "cache every image shrunk and re-encoded for fast loading"),
    "baselines": (_baselines, "the paper's majority-class and random-guessing rows from a split file"),
    "report": (_report, "average runs per system over folds; Table 3 beside the paper's"),
    "composition": (_composition, "predicted-class counts and agreement of prediction files (Fig. 9)"),
    "curves": (_curves, "label-efficiency curves of a sweep: CSV, Markdown, PNG (and W&B)"),
    "status": (_status, "one line per point of a sweep: done, running, queued, failed, missing"),
    "weights": (_weights, "fetch timm ImageNet weights into a file for backbone.weights= (offline clusters)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_console()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<22} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: ssl-kvasir COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nssl-kvasir: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    handler, _ = COMMANDS[name]
    try:
        return handler(rest) or 0
    except (FitInterrupted, Requeued) as e:
        _error_line(name, e, "")
        return e.status
    except KeyboardInterrupt:
        _error_line(name, "interrupted by SIGINT", "")
        return 128 + signal.SIGINT
    except SslKvasirError as e:
        _error_line(name, e)
        return 2
    except OSError as e:  # the message names the path (atomic_write, the embedding store, hold_lock add it)
        _error_line(name, e)
        return 1 if e.errno in RESOURCE_ERRNOS else 2
    finally:
        from ssl_kvasir.run.tracking import release_tracking  # torch-free

        release_tracking()  # the W&B runs this command finished are whole on disk when it returns


# Errors of the machine, not of the input: the same command may succeed once space or the device is back.
RESOURCE_ERRNOS = DISK_ERRNOS | {errno.ENOMEM}


def _error_line(command: str, error: object, label: str = "error: ") -> None:
    """One line on stderr, whatever the message holds (Hydra's and the OS's messages may span lines)."""
    lines = str(error).strip().splitlines()
    if len(lines) > 2 and lines[1].startswith("Original Traceback"):
        # Raised in a DataLoader worker: torch re-raises it with the worker's traceback in the message, whose
        # last line is "module.ErrorType: the original message".
        lines = [lines[-1].split(": ", 1)[-1]]
    text = " ".join(" ".join(lines).split())
    print(f"ssl-kvasir {command}: {label}{text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
