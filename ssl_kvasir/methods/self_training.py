"""Self-training in the Noisy Student style (Xie et al. 2020): teacher -> pseudo-labels -> noised student.

"train a teacher model on labeled images, use the teacher to generate pseudo labels on unlabeled images,
then train a student model on the combination of labeled images and pseudo labeled images ... we iterate
this process by putting back the student as a teacher". The student is noised: RandAugment on the pseudo-labeled
images (the ``strong`` view) and, optionally, dropout and stochastic depth in the backbone
(``method.noise``). Labeled images get the standard weak view, so that the first teacher (round 0, labeled
images only) is as good as the supervised baseline: on short runs a teacher trained on strong views alone
was far weaker.

The rounds are this method's :meth:`SelfTraining.procedure`: each round lives in ``<output_dir>/round_<r>/``
with its own checkpoints, stage results record and ``pseudo_labels.csv``; a finished round is not redone
when the run is restarted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.losses import soft_cross_entropy
from ssl_kvasir.methods.base import BaseMethod, Runner
from ssl_kvasir.pseudo_labels.selection import select_pseudo_labels

log = logging.getLogger("ssl_kvasir")


class SelfTraining(BaseMethod):
    """The labeled loss on labeled images plus, from round 1 on, cross-entropy on noised pseudo-labeled ones.

    The labeled loss is the base's :meth:`~BaseMethod.labeled_loss`: cross-entropy, or with ``loss=logit_adjusted``
    the logit-adjusted loss by the training prior, in every round (the teacher of round 0 included). The
    pseudo-labeled images keep plain cross-entropy: their class mix is the one ``pseudo.balance`` chose, not
    the training prior's.

    Args:
        lambda_pl: weight of the pseudo-labeled loss.
        **base: arguments of :class:`BaseMethod`.
    """

    name = "self_training"
    labeled_views = ("weak",)
    pseudo_views = ("strong",)
    procedure_keys = ("rounds", "pseudo", "noise")

    def __init__(self, lambda_pl: float, **base):
        super().__init__(**base)

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        y_lb = batch["lb"]["label"]
        if "pl" not in batch:
            loss = self.labeled_loss(self.forward_streams(batch, ("x_lb",)).logits["x_lb"], y_lb)
            return {"loss": loss, "loss_x": loss}
        # One forward pass, so BatchNorm normalises labeled and pseudo-labeled images together (Noisy Student).
        out = self.forward_streams(batch, ("x_lb", "x_pl"))
        loss_x = self.labeled_loss(out.logits["x_lb"], y_lb)
        loss_pl = soft_cross_entropy(out.logits["x_pl"], batch["pl"]["target"])  # targets (B_pl, C)
        loss = loss_x + self.hparams.lambda_pl * loss_pl
        return {"loss": loss, "loss_x": loss_x, "loss_pl": loss_pl}

    @classmethod
    def procedure(cls, runner: Runner) -> dict:
        """Every round; writes ``results.json``: the last round's metrics plus a ``rounds`` list with each
        round's metrics and number of pseudo-labels.

        A reviewed pseudo-label file (``pseudo.file``: our CSV, or the authors' format with bare file names)
        is honoured in every round: its images keep their reviewed labels, and the teacher labels the rest of
        the pool.
        """
        from ssl_kvasir.pseudo_labels.table import build_pseudo_label_table, write_pseudo_labels

        rounds, p, noise = runner.config["rounds"], runner.config["pseudo"], runner.config["noise"]
        # The student's model noise, where the method asks for it.
        overrides = {f"backbone.{k}": v for k, v in noise.items() if v}
        reviewed = reviewed_labels(runner, Path(p["file"])) if p["file"] else None
        pseudo = None if reviewed is None else (runner.pool_rows[reviewed[0]], reviewed[1])
        history = []
        for r in range(rounds + 1):
            round_dir = runner.out / f"round_{r}"
            n_pseudo = 0 if pseudo is None else len(pseudo[0])
            results = runner.fit_stage(
                round_dir,
                pseudo_labeled=pseudo,
                extra={"round": r, "n_pseudo": n_pseudo},
                overrides=overrides,
            )
            history.append(
                {
                    "round": r,
                    "n_pseudo": n_pseudo,
                    "metrics": results["metrics"],
                    "val_metrics": results["val_metrics"],
                }
            )
            log.info(
                "self-training round %d: %d pseudo-labels, test MCC %.4f",
                r,
                n_pseudo,
                results["metrics"]["mcc"],
            )
            if r == rounds:
                break
            # The round's selected model becomes the teacher of the next round.
            probs = runner.predict_probs(results["checkpoint"], runner.pool_rows)  # (N_pool, C)
            table = build_pseudo_label_table(
                runner.pool_paths, probs, runner.classes, checkpoint=results["checkpoint"]
            )
            write_pseudo_labels(table, round_dir / "pseudo_labels.csv")
            pseudo = next_pseudo_labels(runner, probs, p, reviewed)
        final = dict(results)
        final.update(method=cls.name, rounds=history, round=rounds)
        runner.write_results(final)
        return final


def next_pseudo_labels(
    runner: Runner, probs: np.ndarray, p: dict, reviewed: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Catalog rows and (M, C) targets of the next round: the reviewed images with their reviewed labels, and
    the teacher's selected pseudo-labels on the rest of the pool."""
    conf, pred = probs.max(1), probs.argmax(1)  # (N,), (N,)
    free = np.ones(len(probs), dtype=bool)
    if reviewed is not None:
        free[reviewed[0]] = False
    positions = select_pseudo_labels(
        np.where(free, conf, -1.0),
        pred,
        runner.num_classes,
        min_confidence=p["threshold"],
        balance=p["balance"],
        max_per_class=p["max_per_class"],
    )
    targets = probs[positions] if p["soft"] else np.eye(runner.num_classes, dtype=np.float32)[pred[positions]]
    if reviewed is not None:
        positions = np.concatenate([reviewed[0], positions])
        targets = np.concatenate([reviewed[1], targets])
    return runner.pool_rows[positions], targets.astype(np.float32)


def reviewed_labels(runner: Runner, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the pool and one-hot (M, C) targets of a reviewed pseudo-label file.

    Rows are matched by path relative to the archive root, or, for bare file names (the authors' format),
    by file name; a name that matches no image of the pool, or several, is an error naming it.
    """
    from ssl_kvasir.pseudo_labels.table import read_pseudo_labels

    table = read_pseudo_labels(path, runner.classes)
    by_path = {p: i for i, p in enumerate(runner.pool_paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(runner.pool_paths):
        by_name.setdefault(Path(p).name, []).append(i)
    positions: list[int] = []
    for entry in table.path:
        if entry in by_path:
            positions.append(by_path[entry])
            continue
        matches = by_name.get(Path(entry).name, []) if "/" not in entry else []
        if len(matches) != 1:
            what = "no image" if not matches else f"{len(matches)} images"
            raise ConfigError(f"{path}: {entry!r} matches {what} of the unlabeled pool")
        positions.append(matches[0])
    targets = np.eye(runner.num_classes, dtype=np.float32)[table.paper_index.to_numpy()]
    return np.asarray(positions, dtype=np.int64), targets
