"""The ``ssl-kvasir`` command: parses arguments, composes configs and calls the library.

Two kinds of sub-commands:
- plain ones (``check``, ``synth``, ``prepare``, ...) take ``--flags``;
- training and analysis ones (``fit``, ``evaluate``, ...) take Hydra overrides ``key=value`` on the configs
  under ``configs/`` (struct mode: a key that does not exist is an error).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ssl_kvasir.errors import SslKvasirError


def _check(argv: list[str]) -> int:
    from ssl_kvasir.data.archive import load_catalog

    p = argparse.ArgumentParser(prog="ssl-kvasir check", description="Validate a downloaded archive.")
    p.add_argument("--root", type=Path, required=True, help="archive root (holds labeled-images/)")
    p.add_argument("--split-file", type=Path, help="official split file (file-name;class-name;split-index)")
    p.add_argument("--generate-folds", type=int, help="check with N generated stratified folds instead")
    p.add_argument("--source", default="hyperkvasir", choices=["hyperkvasir", "folder"])
    p.add_argument("--unlabeled-root", type=Path, help="unlabeled images of a folder source")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    catalog = load_catalog(
        a.root, source=a.source, split_file=a.split_file, generate_folds=a.generate_folds, unlabeled_root=a.unlabeled_root
    )
    summary = catalog.summary()
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_check(summary)
    return 1 if summary["problems"] else 0


def _print_check(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{summary['root']}: {summary['labeled']} labeled, {summary['unlabeled']} unlabeled images")
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, n in summary["classes"].items():
        table.add_row(name, str(n))
    console.print(table)
    console.print("folds: " + ", ".join(f"{k}: {n}" for k, n in summary["folds"].items()))
    if summary["problems"]:
        console.print(f"[red]{len(summary['problems'])} problems:[/red]")
        for problem in summary["problems"]:
            console.print(f"  - {problem}", markup=False, highlight=False)
    else:
        console.print("[green]no problems found[/green]")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "check": (_check, "validate a downloaded archive and its split file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
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
    except SslKvasirError as e:
        print(f"ssl-kvasir {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
