"""Model selection on the validation part: which checkpoint a run is scored with.

With HyperKvasir's small label budgets the validation part is tiny (7 images at 1 % of the labels, 22 at 5-14
labels a class), and a metric such as MCC takes few values on it: checkpoints tie. Lightning's
``ModelCheckpoint`` replaces its best checkpoint only on a strict improvement, so it keeps the *earliest* of
tied checkpoints. Semi-supervised methods gain late (their pseudo-labels need a trained network first), so that
rule scores each of them on an early checkpoint and biases every low-budget comparison against the unlabeled
images. The rules here:

- ``later`` (the default): the best checkpoint on the monitored metric, a tie going to the later one;
- ``earlier``: a tie going to the earlier one (Lightning's rule, the toolkit's former behaviour);
- ``final``: the final weights (the EMA weights where they are evaluated), whatever the validation says.

Below ``min_val_size`` validation images every rule keeps the final weights: one image then moves accuracy
by more than the gains being compared (see the README, "What a comparison holds fixed", for the measurement
behind the default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ssl_kvasir.names import SELECTION_RULES


def describe(rule: str, monitor: str, n_val: int, min_val_size: int) -> str:
    """The rule a run of ``n_val`` validation images is selected by, in words (recorded in ``results.json``)."""
    if rule == "final" or n_val < min_val_size:
        why = "" if rule == "final" else f" ({n_val} validation images, fewer than {min_val_size})"
        return f"final weights{why}"
    return f"best {monitor} on the validation part of the training folds, a tie to the {rule} checkpoint"


class Selection(ModelCheckpoint):
    """``ModelCheckpoint`` keeping one checkpoint, ``best.ckpt``, chosen by a :data:`SELECTION_RULES` rule.

    It remembers the step of the selected checkpoint and whether a tie decided it (another checkpoint scored
    the same), both saved in its state, so a resumed run reports them as an uninterrupted one does.

    Args:
        dirpath: the checkpoints' folder.
        monitor: the validation metric to maximise (``val/mcc``).
        rule: ``later``, ``earlier`` or ``final``.
        n_val: validation images of the run.
        min_val_size: below this many validation images the final weights are kept.
    """

    def __init__(self, dirpath: str | Path, monitor: str, rule: str, n_val: int, min_val_size: int):
        if rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {rule!r}; valid: {', '.join(SELECTION_RULES)}")
        final = rule == "final" or n_val < min_val_size
        super().__init__(
            dirpath=dirpath,
            filename="best",
            # Monitoring nothing, ModelCheckpoint replaces its checkpoint at every epoch: the final weights stay.
            monitor=None if final else monitor,
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        )
        self.rule, self.n_val, self.min_val_size = rule, n_val, min_val_size
        self.rule_text = describe(rule, monitor, n_val, min_val_size)
        self.best_step: int | None = None
        self.tie = False

    @property
    def state_key(self) -> str:
        # Its own key: with the final-weights rule it monitors nothing, as the resume checkpoint (``last``) does,
        # and two callbacks of one key would share one saved state.
        return self._generate_state_key(selection=self.rule, monitor=self.monitor, mode=self.mode)

    def check_monitor_top_k(self, trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        best = self.best_k_models[self.kth_best_model_path]
        tied = bool(current == best)
        take = bool(current > best) or (tied and self.rule == "later")
        take = trainer.strategy.reduce_boolean_decision(take)
        if take:
            self.tie = tied
        elif tied:
            self.tie = True  # the earlier checkpoint stays because of the tie
        return take

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        if not self.best_k_models:
            self.tie = False
        self.best_step = trainer.global_step
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def _save_none_monitor_checkpoint(self, trainer, monitor_candidates) -> None:
        self.best_step, self.tie = trainer.global_step, False
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)

    def record(self) -> dict[str, Any]:
        """``results.json``'s ``selection``: the rule, the selected step, ``n_val`` and whether a tie decided it."""
        return {
            "rule": self.rule,
            "description": self.rule_text,
            "monitor": self.monitor,
            "min_val_size": self.min_val_size,
            "n_val": self.n_val,
            "step": self.best_step,
            "score": None if self.best_model_score is None else float(self.best_model_score),
            "tie": self.tie,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_step": self.best_step, "tie": self.tie}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_step, self.tie = state_dict.get("best_step"), state_dict.get("tie", False)
