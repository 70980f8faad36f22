"""Framework overhead of a FixMatch step: Lightning (the real FixMatch module + Trainer) vs a plain torch loop.

Baseline: a hand-written loop around the FixMatch module's own step: ``step_losses`` (the forward pass,
masking, pseudo-labels and their bookkeeping, the losses), the loss-finiteness check of its
``on_before_backward``, backward, the optimizer and schedule of its ``configure_optimizers`` (SGD with Nesterov
momentum and the weight-decay split, the cosine schedule) and the EMA update of its ``on_train_batch_end``,
called directly with no Trainer. Ours: the FixMatch LightningModule driven by ``lightning.Trainer`` as
``ssl-kvasir fit`` drives it (CSV logger, no progress bar). Both start from the same weights and consume the
same pre-built in-memory batches, so data loading is excluded from both; the two end in the same weights,
which is printed as a check that they did the same work.
The two run in lockstep: after each Lightning step, a callback runs the torch loop's step on the same batch,
so both see the same load of the shared machine; the speed ratio is the median over steps of the paired
ratio torch step time / Lightning step time (the median ignores the steps that another process interrupted).
Target (issue 14): Lightning within 5 % of the plain loop, a speed ratio >= 0.95.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings

import torch
from harness import Paired, Replay, closing_line, fixmatch_batches, paired_summary, parser

NUM_CLASSES = 23
TARGET = 0.95


def _fixmatch_config(total_steps: int, lr: float, num_unlabeled: int, teacher: str) -> dict:
    """FixMatch's config values as ``ssl-kvasir fit`` passes them (configs/method/common.yaml + fixmatch.yaml)."""
    return {
        "class_names": [f"class_{c}" for c in range(NUM_CLASSES)],
        "num_unlabeled": num_unlabeled,
        "labeled_class_counts": [1] * NUM_CLASSES,
        "threshold": 0.95,
        "lambda_u": 1.0,
        "masking": "fixed",
        "alignment": None,
        "teacher": teacher,
        "optimizer": "sgd",
        "lr": lr,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "warmup_steps": 0,
        "max_steps": total_steps,
        "ema_decay": 0.999,
        "ema_warmup": True,
        "eval_weights": "ema",
        "seed": 0,
    }


class TorchFixMatch:
    """A FixMatch module trained by a plain torch loop: the baseline.

    Args:
        network: the network to train (trained in place).
        hp: the same config values the Lightning module gets.
    """

    def __init__(self, network, hp: dict):
        from ssl_kvasir.methods import FixMatch

        self.method = FixMatch.from_config(network, **hp).train()
        self.method.configure_model()  # its EMA, as Lightning makes it before a fit
        optimizers = self.method.configure_optimizers()
        self.opt, self.sched = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        self.model = self.method.model

    def step(self, batch: dict) -> None:
        loss = self.method.step_losses(batch)["loss"]
        self.method.on_before_backward(loss)  # raises when the loss is not finite
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.method.on_train_batch_end(None, batch, 0)  # the EMA update


def run_lockstep(lightning_net, torch_net, batches: list[dict], lr: float, num_unlabeled: int, teacher: str):
    """Train the real FixMatch module with a Trainer and, after each of its steps, the torch loop on the same
    batch, so that each pair of steps runs under the same load of the shared machine.

    Returns:
        the step durations of Lightning and of the torch loop (seconds, one per step after the first), and
        the two trained networks.
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from ssl_kvasir.methods import FixMatch

    hp = _fixmatch_config(len(batches), lr, num_unlabeled, teacher)
    baseline = TorchFixMatch(torch_net, hp)

    class Lockstep(Callback):
        """Clocks Lightning from the end of the previous torch step to this callback (which Lightning calls
        before the module's own ``on_train_batch_end``, so the module's EMA update falls in the next interval
        and every piece of Lightning's work is counted once), then runs and clocks the torch step."""

        def __init__(self):
            self.lightning: list[float] = []
            self.torch: list[float] = []
            self.resumed: float | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self.resumed is not None:
                self.lightning.append(now - self.resumed)
            start = time.perf_counter()
            baseline.step(batches[batch_idx])
            self.resumed = time.perf_counter()
            if batch_idx > 0:
                self.torch.append(self.resumed - start)

    module = FixMatch.from_config(lightning_net, **hp)
    clock = Lockstep()
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(
            max_steps=len(batches),
            max_epochs=-1,
            accelerator="cpu",
            devices=1,
            precision="32-true",
            logger=CSVLogger(save_dir=out, name="logs", version=""),
            callbacks=[clock],
            enable_checkpointing=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=50,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(module, train_dataloaders=Replay(batches))
    return clock.lightning, clock.torch, module.model, baseline.model


def bench(
    backbone: str, image_size: int, batch_size: int, mu: int, steps: int, warmup: int, teacher: str
) -> Paired:
    """One configuration in lockstep; prints its line and returns the paired torch/Lightning step times."""
    from ssl_kvasir.models import build_network

    num_unlabeled = 10_000
    torch.manual_seed(0)
    initial = build_network(backbone, NUM_CLASSES)
    batches = fixmatch_batches(
        warmup + steps, batch_size, mu, image_size, num_classes=NUM_CLASSES, num_unlabeled=num_unlabeled
    )
    lt, pt, lnet, tnet = run_lockstep(
        copy.deepcopy(initial), copy.deepcopy(initial), batches, 0.03, num_unlabeled, teacher
    )
    # The first steps (allocator warm-up, Lightning's first-batch setup) are not timed.
    lt, pt = lt[warmup - 1 :], pt[warmup - 1 :]
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(lnet.state_dict().values(), tnet.state_dict().values(), strict=True)
        if a.dtype.is_floating_point
    )
    paired = paired_summary(lt, pt)  # ratio: Lightning step time / torch step time, median over steps
    l_ms, t_ms = 1e3 * paired.median_a, 1e3 * paired.median_b
    print(
        f"fixmatch step {backbone} {image_size}px B={batch_size} mu={mu} teacher={teacher}, {len(lt)} timed steps: "
        f"torch loop {t_ms:6.1f} ms | Lightning {l_ms:6.1f} ms (medians) | overhead {l_ms - t_ms:+.1f} ms/step | "
        f"Lightning/torch speed (paired median) {1 / paired.ratio:.3f}x | max weight difference {drift:.2e}"
    )
    return paired


def main() -> None:
    p = parser(__doc__, quick="one small configuration (the default teacher), fewer steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's hints about workers and loggers are not what is measured
    import lightning  # noqa: F401 - its import sets its loggers' levels, which are lowered after it

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    configs = [("test_resnet", 32, "model")]
    if not args.quick:
        configs += [("test_resnet", 32, "ema"), ("resnet10t", 64, "model")]
    speeds = []
    for backbone, size, teacher in configs:
        paired = bench(
            backbone, size, batch_size=16, mu=7, steps=20 if args.quick else 60, warmup=5, teacher=teacher
        )
        speeds.append(1 / paired.ratio)
    closing_line(
        "overhead", "Lightning / torch loop speed (worst configuration)", min(speeds), ">=", TARGET, digits=3
    )


if __name__ == "__main__":
    main()
