"""The base LightningModule: modules, EMA, optimizer, schedule, evaluation and prediction.

A method adds only its ``__init__`` arguments and its losses (solo-learn's split): the base runs the step's
streams through the network in one forward pass (:meth:`BaseMethod.forward_streams`), hands the outputs to the
method's :meth:`BaseMethod.step_losses` and logs what it returns. A method declares the views its training
streams need; the DataModule serves them, so no dataset branches on a method's name.

Extension points, so that a new method never edits this file:

- :meth:`BaseMethod.trainable_modules`: what the optimizer trains and the EMA averages. By default every
  submodule with trainable parameters (the network, and any head or projector a method adds in its
  ``__init__``).
- :meth:`BaseMethod.classify`: how a set of those modules (live or averaged) predicts; override it to predict
  through another head.
- :meth:`BaseMethod.from_config`: turns a method's config (strategy names, facts about the data) into the
  strategy objects its constructor takes.
- :meth:`BaseMethod.procedure`: what a run of the method is. One fit by default; a multi-stage method
  (self-training's rounds) drives the stages itself through the :class:`Runner` it is handed.
- :meth:`BaseMethod.prior_estimator`: an estimate of the unlabeled pool's class mix that the method keeps (ACR's,
  SimPro's); the base folds it in at every epoch start, logs it and reports it (:attr:`BaseMethod.unlabeled_prior`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import seed_everything
from torch import nn

from ssl_kvasir.errors import SslKvasirError
from ssl_kvasir.losses import logit_adjusted_cross_entropy
from ssl_kvasir.models import EMA, Network
from ssl_kvasir.names import EVAL_WEIGHTS, LABELED_LOSSES, OPTIMIZERS, SCHEDULES

# Strategy objects (masking, alignment, priors) are constructor arguments and modules: their state is saved in
# the state dict and their config by from_config, so Lightning's advice to ignore them does not apply.
warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")

STREAMS: dict[str, tuple[str, str]] = {
    "x_lb": ("lb", "weak"),
    "x_ulb_w": ("ulb", "weak"),
    "x_ulb_s": ("ulb", "strong"),
    "x_pl": ("pl", "strong"),
}
"""A step's image streams by USB's names -> (stream of the batch, view): labeled, unlabeled weak and strong,
pseudo-labeled (self-training's students)."""


@dataclass(frozen=True)
class StreamOutputs:
    """The network's outputs on a step's streams, computed in one forward pass.

    Attributes:
        logits: stream name (:data:`STREAMS`) -> its (B_stream, C) logits.
        sizes: stream name -> its batch size, in the order of the forward pass.
        features: stream name -> its (B_stream, D) features; empty unless asked for.
        joint_features: the (N, D) features of all the streams in one tensor (another head runs on it once and
            :meth:`split` cuts its output); None unless asked for.
    """

    logits: dict[str, torch.Tensor]
    sizes: dict[str, int]
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    joint_features: torch.Tensor | None = None

    def split(self, joint: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a (N, ...) tensor over all the streams (another head on the joint features) by stream."""
        return dict(zip(self.sizes, joint.split(list(self.sizes.values())), strict=True))


class PriorEstimator(Protocol):
    """An estimate of the unlabeled pool's class mix kept by a method (ACR's, SimPro's), updated over an epoch."""

    unlabeled_prior: torch.Tensor  # (C,) shares, summing to 1

    def end_epoch(self) -> None:
        """Fold the epoch's statistics into the estimate and start the next epoch's."""
        ...


class TrainingDiverged(SslKvasirError):
    """The loss stopped being finite."""


class Runner(Protocol):
    """What the run layer offers a method's :meth:`~BaseMethod.procedure` (implemented in ``ssl_kvasir.run``).

    Attributes:
        config: the method's own config keys that its constructor does not take (``procedure_keys``).
        out: the run's output folder.
        num_classes: C.
        classes: the class table (a ``ssl_kvasir.data.classes.ClassTable``).
        pool_rows: catalog rows of the unlabeled pool.
        pool_paths: their paths relative to the archive root.
        pool_labels: their labels (-1 where unknown).
    """

    config: Mapping[str, Any]
    out: Path
    num_classes: int
    classes: Any
    pool_rows: np.ndarray
    pool_paths: np.ndarray
    pool_labels: np.ndarray

    def fit_stage(
        self,
        out: Path,
        pseudo_labeled: tuple[np.ndarray, np.ndarray] | None = None,
        extra: dict | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> dict:
        """One Lightning fit + selection + test into ``out``: the run's folder (its results record) or a stage's
        folder below it (a stage record, which sweeps and curves do not count). Returns its results (reused
        when finished), whose ``checkpoint`` is relative to the run's folder."""
        ...

    def predict_probs(self, checkpoint: str | Path, rows: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities of catalog ``rows`` from a checkpoint (relative to the run's folder),
        through the one prediction path."""
        ...

    def write_results(self, results: dict) -> None:
        """Write the run's results record."""
        ...


def fixmatch_cosine(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """FixMatch's learning-rate factor ``cos(7 pi k / (16 K))`` after an optional linear warm-up.

    The 7/16 keeps the final rate at cos(7 pi / 16) = 0.2 of the initial one instead of decaying to zero.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    k, K = step - warmup_steps, max(total_steps - warmup_steps, 1)
    return math.cos(7 * math.pi * min(k, K) / (16 * K))


class BaseMethod(L.LightningModule):
    """Owns the network, the EMA of its trainable modules, the optimizer and schedule, the training step's forward
    pass and logging, and evaluation.

    The settings have no defaults here: they live in the method's YAML (``configs/method/``), which
    :meth:`from_config` reads for any setting it is not given. Only facts about the data and the run default
    (no labeled class counts: uniform; seed 0).

    Args:
        network: backbone + head.
        class_names: names in index order (for per-class logs and reports).
        labeled_class_counts: images per class in one pass of the labeled stream *as sampled* (the training
            prior times ``|L|``, :attr:`~ssl_kvasir.data.datamodule.KvasirDataModule.training_prior`): the
            labeled set's counts under ``data.sampler=uniform``, ``|L| / K`` for each of its K classes under
            ``class_balanced``. Logit adjustment, alignment targets, ACR's anchors and SimPro's starting prior
            all use it, so a balanced stream is not corrected a second time.
        optimizer: ``sgd`` (with Nesterov momentum) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: on weights only (not on biases and normalisation parameters).
        schedule: ``cosine`` (FixMatch's) or ``constant``.
        warmup_steps: linear warm-up steps.
        max_steps: total steps, the K of the cosine schedule.
        ema_decay: final EMA decay; 0 disables the EMA.
        ema_warmup: warm the EMA decay up (see :class:`~ssl_kvasir.models.EMA`).
        eval_weights: ``ema`` or ``model``: which weights validation, test and prediction use.
        seed: re-seeds the random generators at every epoch start, so a resumed run repeats an
            uninterrupted one.
        loss: the labeled loss, ``ce`` or ``logit_adjusted`` (Menon et al. 2021; see :meth:`labeled_loss`).
        la_tau: strength tau of the logit adjustment.
    """

    labeled_prior: torch.Tensor
    hparams: Any  # Lightning's AttributeDict: the constructor's settings, read as attributes
    _hparams_initial: Any
    data_settings: dict[str, Any]  # set by ssl_kvasir.run.checkpoint.load_method: what the data was

    name: ClassVar[str] = "base"
    labeled_views: ClassVar[tuple[str, ...]] = ("weak",)
    unlabeled_views: ClassVar[tuple[str, ...]] = ()
    pseudo_views: ClassVar[tuple[str, ...]] = ()
    # Keys of the method's config read by its procedure, not by its constructor.
    procedure_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        network: Network,
        class_names: list[str],
        labeled_class_counts: list[float] | None = None,
        optimizer: str,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        schedule: str,
        warmup_steps: int,
        max_steps: int,
        ema_decay: float,
        ema_warmup: bool,
        eval_weights: str,
        seed: int = 0,
        loss: str,
        la_tau: float,
    ):
        super().__init__()
        if loss not in LABELED_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LABELED_LOSSES)}")
        if loss == "logit_adjusted" and labeled_class_counts is None:
            raise ValueError("loss=logit_adjusted needs labeled_class_counts (the labeled class prior)")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if eval_weights not in EVAL_WEIGHTS:
            raise ValueError(f"unknown eval_weights {eval_weights!r}; valid: {', '.join(EVAL_WEIGHTS)}")
        if optimizer == "sgd" and nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0 (set nesterov=false)")
        if eval_weights == "ema" and not ema_decay:
            raise ValueError("eval_weights=ema needs an EMA (ema_decay > 0)")
        if labeled_class_counts is not None and len(labeled_class_counts) != len(class_names):
            raise ValueError(
                f"labeled_class_counts has {len(labeled_class_counts)} entries for {len(class_names)} classes"
            )
        self.save_hyperparameters(ignore=["network"])
        # Strategy objects handed to a subclass are modules, saved as state; their config is saved by from_config.
        for key in [k for k, v in self.hparams.items() if isinstance(v, nn.Module)]:
            del self.hparams[key], self._hparams_initial[key]
        self.model = network
        self.num_classes = len(class_names)
        counts = torch.tensor(labeled_class_counts or [1] * self.num_classes, dtype=torch.float)
        self.register_buffer("labeled_prior", counts / counts.sum(), persistent=False)  # (C,)
        # Made by configure_model, once the subclass has added its own modules.
        self.ema: EMA | None = None
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_eval: dict = {}

    # ---- construction from a config ----------------------------------------------------------------
    @classmethod
    def data_kwargs(cls, datamodule) -> dict:
        """Constructor arguments that come from the data: the labeled stream's class counts as sampled, and what
        a method needs more (the unlabeled pool's size, ...)."""
        n_labeled = len(datamodule.streams["lb"].labels)
        return {"labeled_class_counts": [n_labeled * float(p) for p in datamodule.training_prior]}

    @classmethod
    def from_config(cls, network: Network, **config) -> BaseMethod:
        """Build the method from plain config values (what a config file and the data say).

        A setting not given takes its value from the method's YAML (:func:`ssl_kvasir.config.method_defaults`),
        the one place defaults live. Methods whose constructor takes strategy objects turn the config's names
        into objects here (see :meth:`FixMatch.strategies <ssl_kvasir.methods.fixmatch.FixMatch.strategies>`).
        The config values are stored as the hyper-parameters, so a checkpoint rebuilds the method through this
        same call.
        """
        config = {**cls.config_defaults(), **config}
        module = cls(network=network, **cls.strategies(config))
        module.save_hyperparameters({**module.hparams, **config})
        return module

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        """The constructor's settings in ``configs/method/<name>.yaml`` (not its name, not its procedure's keys);
        nothing for a method without a config file (one defined outside the registry, handed a full config)."""
        from ssl_kvasir.config import method_defaults, method_names

        if cls.name not in method_names():
            return {}
        skip = {"name", *cls.procedure_keys}
        return {k: v for k, v in method_defaults(cls.name).items() if k not in skip}

    @classmethod
    def strategies(cls, config: dict) -> dict:
        """Constructor arguments from config values; the base class takes them as they are."""
        return dict(config)

    @classmethod
    def procedure(cls, runner: Runner) -> dict:
        """A run of this method: one fit, selection on validation, test. Returns the results."""
        return runner.fit_stage(runner.out)

    # ---- the modules that train --------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules the optimizer trains and the EMA averages, by attribute name.

        Every direct submodule with a trainable parameter, except the EMA itself: a method that adds a head or
        a projector in its ``__init__`` gets it trained and averaged without overriding anything.
        """
        return {
            name: module
            for name, module in self.named_children()
            if name != "ema" and any(p.requires_grad for p in module.parameters())
        }

    def configure_model(self) -> None:
        """Make the EMA of the trainable modules (Lightning calls this before restoring a checkpoint)."""
        if self.ema is None and self.hparams.ema_decay:
            self.ema = EMA(self._live_modules(), self.hparams.ema_decay, self.hparams.ema_warmup)

    def _live_modules(self) -> nn.ModuleDict:
        # Kept outside the module tree (not a registered child), so the parameters are not listed twice.
        if "_live" not in self.__dict__:
            self.__dict__["_live"] = nn.ModuleDict(self.trainable_modules())
        return self.__dict__["_live"]

    # ---- training plumbing -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self._live_modules().parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.schedule == "constant":
            factor = (lambda k: min(1.0, (k + 1) / hp.warmup_steps)) if hp.warmup_steps else (lambda k: 1.0)
        else:
            factor = lambda k: fixmatch_cosine(k, hp.max_steps, hp.warmup_steps)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        """Re-seed; fold the last epoch into the unlabeled prior estimate, if the method keeps one, and log it.

        The estimate is folded in at the epoch start, not at the epoch end, so that a run resumed from an
        epoch-end checkpoint (which holds the epoch's running sums) does the same as an uninterrupted one.
        """
        seed_everything(self.hparams.seed * 1000 + self.current_epoch, workers=True, verbose=False)
        estimator = self.prior_estimator()
        if estimator is not None:
            if self.current_epoch > 0:
                estimator.end_epoch()
            prior = cast("dict[str, float]", self.unlabeled_prior)  # the estimator's, not None
            self.log_dict({f"train/unlabeled_prior/{n}": p for n, p in prior.items()})

    def on_train_end(self) -> None:
        """Fold the last epoch into the unlabeled prior estimate too, so that it has seen every epoch."""
        estimator = self.prior_estimator()
        if estimator is not None:
            estimator.end_epoch()

    def prior_estimator(self) -> PriorEstimator | None:
        """The method's estimate of the unlabeled class mix (ACR's, SimPro's), or None (the default)."""
        return None

    def fit_warnings(self) -> list[str]:
        """Lines that a fit of this method prints as warnings at its start and records in ``results.json``
        (``warnings``): settings under which the method does no more than a simpler one. None by default."""
        return []

    @property
    def unlabeled_prior(self) -> dict[str, float] | None:
        """The estimated class mix of the unlabeled images, class name -> share (sums to 1), or None when the
        method keeps no estimate. ``results.json`` and the analysis report it."""
        estimator = self.prior_estimator()
        if estimator is None:
            return None
        return {n: float(p) for n, p in zip(self.hparams.class_names, estimator.unlabeled_prior, strict=True)}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.global_step}; the last good checkpoint "
                "is kept (checkpoints/last.ckpt); lower the learning rate or check the data"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self._live_modules())

    def forward_streams(self, batch: dict, streams: Sequence[str], features: bool = False) -> StreamOutputs:
        """The network's logits (and features, with ``features=True``) on the named streams of ``batch``
        (:data:`STREAMS`), in one forward pass: BatchNorm normalises the streams as one batch, as FixMatch does.
        """
        images = [batch[part][view] for part, view in (STREAMS[name] for name in streams)]
        shape = StreamOutputs({}, {name: len(x) for name, x in zip(streams, images, strict=True)})
        joint = torch.cat(images)  # (N, 3, H, W), N the sum of the streams' sizes
        if not features:
            return StreamOutputs(shape.split(self.model(joint)), shape.sizes)  # each (B_stream, C)
        joint_features, joint_logits = self.model.features_and_logits(joint)  # (N, D), (N, C)
        return StreamOutputs(
            shape.split(joint_logits), shape.sizes, shape.split(joint_features), joint_features
        )

    def step_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """A training step's scalars by name: ``loss``, what the optimizer minimises, and what to log beside it
        (``loss_x``, ``mask_rate``...). Every method implements it."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """The method's :meth:`step_losses`, logged as ``train/<name>`` through :meth:`log_training_step`."""
        values = self.step_losses(batch)
        self.log_training_step({f"train/{k}": v for k, v in values.items()})
        return values["loss"]

    def log_training_step(self, values: dict[str, torch.Tensor]) -> None:
        """Log a training step's scalars (and show them in the progress bar) on the steps where they are read.

        Each ``self.log`` call costs Lightning bookkeeping on the host (about 0.2 ms a key here, a walk over
        its stored result), while the logger writes only every ``trainer.log_every_n_steps`` steps. So the
        values are logged on those steps, on an epoch's last batch (for the console line) and, when a progress
        bar is shown, on every step.
        """
        trainer = self._trainer
        if (
            trainer is None
            or trainer.progress_bar_callback is not None
            or trainer.is_last_batch
            or trainer._logger_connector.should_update_logs  # Lightning's own rule for the logger's writes
        ):
            self.log_dict(values, prog_bar=True)

    def labeled_loss(
        self, logits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The labeled loss named by ``loss``: cross-entropy, or the logit-adjusted cross-entropy of
        ``logits + la_tau * log prior`` (Menon et al. 2021), whose raw logits then predict balanced classes.

        Args:
            logits: (B, C).
            y: (B,) labels.
            prior: (C,) the class prior to adjust by; the labeled set's by default (a method that estimates
                the training prior, such as SimPro, passes its own).
        """
        if self.hparams.loss == "ce":
            return F.cross_entropy(logits, y)
        prior = self.labeled_prior if prior is None else prior
        return logit_adjusted_cross_entropy(logits, y, prior, tau=self.hparams.la_tau)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every process, concatenated along the batch (``x`` itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return cast(torch.Tensor, self.all_gather(x)).flatten(0, 1)

    # ---- prediction ----------------------------------------------------------------------------------
    def classify(self, modules: nn.ModuleDict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D) and logits (B, C) of images ``x`` by ``modules`` (live or averaged copies, keyed as
        :meth:`trainable_modules`). Override to predict through another head."""
        return cast(Network, modules["model"]).features_and_logits(x)

    @property
    def ema_modules(self) -> nn.ModuleDict:
        """The averaged copies of the trainable modules, keyed as :meth:`trainable_modules`, of a method made with
        ``ema_decay`` > 0 once :meth:`configure_model` has run."""
        assert self.ema is not None, "no EMA: ema_decay is 0 or configure_model has not run"
        return cast(nn.ModuleDict, self.ema.module)  # the average of _live_modules(), a ModuleDict

    @property
    def eval_modules(self) -> nn.ModuleDict:
        """The modules validation, test and prediction use: the EMA copies or the live ones (``eval_weights``)."""
        if self.hparams.eval_weights == "ema":
            if self.ema is None:
                self.configure_model()
            return self.ema_modules
        return self._live_modules()

    def predict_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, D) and logits (B, C) with the evaluation weights: the one way this module predicts."""
        return self.classify(self.eval_modules, x)

    @property
    def feature_dim(self) -> int:
        """D of :meth:`predict_batch`'s features."""
        return self.model.num_features

    # ---- evaluation --------------------------------------------------------------------------------
    def _eval_step(self, batch: dict) -> None:
        _, logits = self.predict_batch(batch["eval"])  # (B, C)
        self._outputs.append((batch["label"].cpu(), logits.argmax(1).cpu()))

    def _eval_epoch_end(self, stage: str) -> None:
        from ssl_kvasir.metrics import confusion_matrix, metrics_from_confusion

        if not self._outputs:
            return
        y_true = torch.cat([y for y, _ in self._outputs]).numpy()
        y_pred = torch.cat([p for _, p in self._outputs]).numpy()
        self._outputs.clear()
        cm = confusion_matrix(y_true, y_pred, self.num_classes)
        metrics = metrics_from_confusion(cm)
        self.last_eval[stage] = {"metrics": metrics, "confusion_matrix": cm}
        # Every process evaluated the whole set (no distributed sampler), so no reduction is needed.
        self.log_dict(
            {f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["network_spec"] = dict(self.model.spec)
        checkpoint["method"] = self.name
