"""bench/harness.py: the closing line's exact format, paired medians against a naive computation, and the
synthetic FixMatch batches' shapes; and every benchmark in bench/ ends with a closing line."""

from __future__ import annotations

import ast
import importlib.util
import re
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# What `make bench` and a reader look for: `<benchmark>: <what> = <value> (target <op> <target>: met)`.
MAKE_LINE = re.compile(r"^[a-z_]+: .+ = .+ \(target .+\)$")
"""What `make bench` collects as closing lines (the Makefile's grep)."""
LINE = re.compile(
    r"^[a-z_]+: .+ = (n/a|-?\d+(\.\d+)?) \(target (>=|>|<=|<) [\d.e+-]+: (met|NOT met|not measured, .+)\)$"
)


def _harness():
    spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_harness"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_closing_line_format(capsys: pytest.CaptureFixture) -> None:
    h = _harness()
    cases = [
        (("umap", "analysis speed-up", 3.04, ">=", 3, 1), "umap: analysis speed-up = 3.0 (target >= 3: met)"),
        (
            ("umap", "analysis speed-up", 2.96, ">=", 3, 1),
            "umap: analysis speed-up = 3.0 (target >= 3: NOT met)",
        ),
        (("overhead", "speed", 0.95, ">=", 0.95, 3), "overhead: speed = 0.950 (target >= 0.95: met)"),
        (
            ("export", "memory ratio", 1.7, "<=", 1.5, 2),
            "export: memory ratio = 1.70 (target <= 1.5: NOT met)",
        ),
        (("x", "y", 2.0, "<", 2, 0), "x: y = 2 (target < 2: NOT met)"),
        (("x", "y", float("nan"), ">", 0, 2), "x: y = nan (target > 0: NOT met)"),
    ]
    for args, expected in cases:
        assert h.closing_line(*args) == expected
        assert capsys.readouterr().out == expected + "\n"
    line = h.closing_line("gpu", "bf16 speed", None, ">=", 1.3, unmeasured="no CUDA device")
    assert line == "gpu: bf16 speed = n/a (target >= 1.3: not measured, no CUDA device)"
    for args, _ in cases[:5]:
        assert LINE.match(h.closing_line(*args))
    assert LINE.match(line)
    with pytest.raises(ValueError, match="op must be one of"):
        h.closing_line("x", "y", 1.0, "=>", 1)
    with pytest.raises(ValueError, match="needs the reason"):
        h.closing_line("x", "y", None, ">=", 1)


def test_gain_line_format() -> None:
    """A paired comparison's closing line: mean ± standard error, the target, and the verdict; a target in
    standard errors is never met by one seed."""
    h = _harness()
    five = [0.01, 0.03, 0.02, 0.0, 0.035]  # mean 0.019, se 0.00648
    assert (
        h.gain_line("imbalance", "acr gain, 5 seeds", five, ">=", 0.02, min_se=2)
        == "imbalance: acr gain, 5 seeds = +0.019 ± 0.006 (target >= +0.02 and >= 2 se: NOT met)"
    )
    assert h.gain_line("imbalance", "g", [x + 0.01 for x in five], ">=", 0.02, min_se=2).endswith(": met)")
    assert h.gain_line("imbalance", "g", [0.05], ">=", 0.02, min_se=2).endswith(
        "± n/a (target >= +0.02 and >= 2 se: NOT met)"
    )
    assert (
        h.gain_line("review", "g", [0.01, -0.02, 0.007], ">", 0)
        == "review: g = -0.001 ± 0.010 (target > 0: NOT met)"
    )
    for args in [("a", "b", five, ">=", 0.02), ("review", "g", [0.01, -0.02, 0.007], ">", 0)]:
        assert MAKE_LINE.match(h.gain_line(*args))


def test_paired_summary_equals_a_naive_median_of_ratios() -> None:
    h = _harness()
    a, b = [3.0, 1.0, 8.0, 2.0], [1.0, 1.0, 2.0, 4.0]
    paired = h.paired_summary(a, b)
    assert paired.ratio == statistics.median([3.0, 1.0, 4.0, 0.5]) == 2.0
    assert (paired.median_a, paired.median_b, paired.rounds) == (2.5, 1.5, 4)
    calls = []
    timed = h.paired_medians(lambda: calls.append("a"), lambda: calls.append("b"), rounds=3)
    assert calls == ["a", "b"] * 3 and timed.rounds == 3  # alternating, baseline first
    seconds, out = h.best_of(lambda: 7, repeat=2)
    assert out == 7 and seconds >= 0
    with pytest.raises(ValueError):
        h.paired_summary([1.0], [])


def test_fixmatch_batches_have_the_datamodule_keys_and_shapes() -> None:
    h = _harness()
    batches = h.fixmatch_batches(2, batch_size=3, mu=2, image_size=8, num_classes=5, num_unlabeled=20)
    assert len(batches) == 2
    lb, ulb = batches[0]["lb"], batches[0]["ulb"]
    assert lb["weak"].shape == (3, 3, 8, 8) and lb["label"].shape == (3,)
    assert ulb["weak"].shape == ulb["strong"].shape == (6, 3, 8, 8)
    assert set(lb) == {"weak", "label", "pos", "index"} and set(ulb) == {
        "weak",
        "strong",
        "label",
        "pos",
        "index",
    }
    assert ulb["pos"].max() < 20 and ((ulb["label"] >= -1) & (ulb["label"] < 5)).all()
    again = h.fixmatch_batches(2, batch_size=3, mu=2, image_size=8, num_classes=5, num_unlabeled=20)
    assert (again[1]["ulb"]["strong"] == batches[1]["ulb"]["strong"]).all()  # seeded


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_every_benchmark_ends_with_a_closing_line(script: str) -> None:
    """Statically: the script calls the harness's closing_line or gain_line (running them all is `make bench`'s job)."""
    tree = ast.parse((BENCH / script).read_text())
    called = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert called & {"closing_line", "gain_line"}, (
        f"{script} does not print its closing line through bench/harness.py"
    )
