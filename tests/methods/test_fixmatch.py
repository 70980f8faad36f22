"""FixMatch's per-step bookkeeping without host-device syncs, and training scalars logged only where read."""

from __future__ import annotations

import csv
import logging
import warnings

import numpy as np
import pytest
import torch

from ssl_kvasir.methods import FixMatch
from ssl_kvasir.models import build_network

C = 5


def _batch(seed: int, n_lb: int = 4, n_ulb: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ulb_label = torch.randint(0, C, (n_ulb,), generator=g)
    ulb_label[::3] = -1  # images whose class is unknown
    return {
        "lb": {
            "weak": torch.randn(n_lb, 3, 32, 32, generator=g),
            "label": torch.randint(0, C, (n_lb,), generator=g),
        },
        "ulb": {
            "weak": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "strong": torch.randn(n_ulb, 3, 32, 32, generator=g),
            "label": ulb_label,
            "pos": torch.arange(n_ulb),
        },
    }


def _fixmatch(threshold: float, max_steps: int = 10) -> FixMatch:
    torch.manual_seed(0)
    module = FixMatch.from_config(
        build_network("test_resnet", C),
        class_names=list("abcde"),
        max_steps=max_steps,
        labeled_class_counts=[1] * C,
        num_unlabeled=12,
        threshold=threshold,
        teacher="model",
    )
    module.configure_model()
    return module


def test_pseudo_label_counters_equal_a_naive_count() -> None:
    module = _fixmatch(threshold=0.0).train()  # every pseudo-label passes the mask
    total, correct = np.zeros(C), np.zeros(C)
    for seed in range(3):
        batch = _batch(seed)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with torch.no_grad():  # the same forward the step makes, for the naive count
            x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
            pseudo = module.model(x)[4:16].argmax(1).numpy()
        module.load_state_dict(state)  # BatchNorm statistics as before the naive forward
        module.training_step(batch, seed)
        y = batch["ulb"]["label"].numpy()
        for p, t in zip(pseudo, y, strict=True):
            if t >= 0:
                total[p] += 1
                correct[p] += p == t
    np.testing.assert_array_equal(module._pl_total.numpy(), total)
    np.testing.assert_array_equal(module._pl_correct.numpy(), correct)


def _fit(module: FixMatch, steps: int, every: int, progress_bar: bool, tmp_path) -> tuple[int, list[dict]]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    calls = []
    log_dict = module.log_dict
    module.log_dict = lambda values, **kw: (calls.append(sorted(values)), log_dict(values, **kw))  # type: ignore[method-assign]

    class Loader:
        def __iter__(self):
            return iter(_batch(i) for i in range(steps))

        def __len__(self) -> int:
            return steps

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=CSVLogger(tmp_path, name="logs", version=""),
            log_every_n_steps=every,
            enable_progress_bar=progress_bar,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        ).fit(module, train_dataloaders=Loader())
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return len([c for c in calls if "train/loss" in c]), rows


@pytest.mark.parametrize("progress_bar", [False, True])
def test_training_scalars_are_logged_on_the_steps_the_logger_writes(progress_bar: bool, tmp_path) -> None:
    logged, rows = _fit(
        _fixmatch(threshold=0.5, max_steps=7), steps=7, every=3, progress_bar=progress_bar, tmp_path=tmp_path
    )
    written = [int(r["step"]) for r in rows]
    assert written == [2, 5]  # Lightning writes every third step (steps counted from 0)...
    # ...and the values are logged on those steps and the epoch's last one only, unless a bar shows them.
    assert logged == (7 if progress_bar else 3)
    assert all(np.isfinite(float(r["train/loss"])) for r in rows)
