"""``ssl-kvasir report``: our runs beside the paper's Table 3 (:mod:`ssl_kvasir.study.table3`), the recall of the
rarest classes (:mod:`ssl_kvasir.study.rare_classes`) and each system's confusion matrix, written into one folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES, ClassTable
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write_text
from ssl_kvasir.study.baselines import split_file_baselines
from ssl_kvasir.study.rare_classes import (
    rare_class_tables,
    render_rare_csv,
    render_rare_markdown,
)
from ssl_kvasir.study.results import find_results_files
from ssl_kvasir.study.table3 import (
    TableRow,
    baseline_rows,
    file_slug,
    in_paper_order,
    load_result,
    render_csv,
    render_markdown,
    summarize_systems,
    system_rows,
)


def write_report(
    run_paths: Sequence[str | Path],
    out_dir: str | Path,
    split_file: str | Path | None = None,
    seed: int = 0,
    n_random_repeats: int = 100,
) -> list[TableRow]:
    """Read runs, write ``table3.csv``, ``table3.md``, ``rare_classes.csv`` and ``confusion_<system>.png``.

    ``table3.md`` holds Table 3 and, below it, the recall of the rarest classes per system
    (:func:`~ssl_kvasir.study.rare_classes.rare_class_tables`); ``rare_classes.csv`` holds the same recalls
    in long form.

    Args:
        run_paths: results files, run folders or folders above runs.
        out_dir: where the report goes (created if needed; other files in it are left alone).
        split_file: when given, the majority-class and random-guessing baselines computed from it are added,
            and its folds are the folds every system is expected to have.
        seed: seed of the random-guessing baseline.
        n_random_repeats: repeats of the random-guessing baseline.

    Returns:
        the table's rows: systems, then baselines.

    Raises:
        DataError: naming the file, for a missing or malformed results file or split file.
    """
    from ssl_kvasir.analysis.plots import plot_confusion_matrix

    out_dir = Path(out_dir)
    runs = [load_result(p) for p in find_results_files(run_paths)]
    if not runs:
        raise DataError("no run folders given: name at least one results.json or a folder above one")
    baselines, split_folds = [], None
    if split_file is not None:
        # The split file's class names belong to HyperKvasir unless the runs name other classes.
        hyperkvasir = all(in_paper_order(r)[1] is not None for r in runs)
        classes = HYPERKVASIR_CLASSES if hyperkvasir else ClassTable.from_names(runs[0].classes)
        baselines = split_file_baselines(Path(split_file), classes, seed=seed, n_repeats=n_random_repeats)
        split_folds = baselines[0].folds
    systems = summarize_systems(runs, expected_folds=split_folds)
    rows = system_rows(systems) + baseline_rows(baselines)

    atomic_write_text(out_dir / "table3.csv", render_csv(rows))
    legends = []
    for class_list in dict.fromkeys(tuple(s.classes) for s in systems):
        table = ClassTable.from_names(class_list)
        legends.append(", ".join(f"{c.letter} {c.folder}" for c in table))
    markdown = render_markdown(rows) + "".join(
        f"\nConfusion matrices (rows true, columns predicted): {legend}.\n" for legend in legends
    )
    rare = rare_class_tables(systems)
    atomic_write_text(out_dir / "table3.md", markdown + "\n" + render_rare_markdown(rare))
    atomic_write_text(out_dir / "rare_classes.csv", render_rare_csv(rare))
    used: set[str] = set()
    for s in systems:
        slug, k = file_slug(s.name), 2
        while slug in used:
            slug, k = f"{file_slug(s.name)}-{k}", k + 1
        used.add(slug)
        letters = ClassTable.from_names(s.classes).letters
        folds = ", ".join(map(str, sorted(s.fold_metrics)))
        title = f"{s.name}: {len(s.runs)} runs summed (fold {folds})"
        plot_confusion_matrix(
            s.confusion, letters, out_dir / f"confusion_{slug}.png", title=title, normalize=True
        )
    return rows
