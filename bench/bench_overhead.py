"""Framework overhead of a FixMatch step: Lightning (the real FixMatch module + Trainer) vs a plain torch loop.

Baseline: a hand-written loop doing the same computation as ``FixMatch.training_step`` with the EMA teacher
(one forward of the labeled and strong batches, an EMA forward of the weak batch, fixed-threshold masking,
cross-entropy + masked cross-entropy, SGD with Nesterov momentum and the weight-decay split, the cosine
schedule, the EMA update, the loss-finiteness check and the pseudo-label bookkeeping). Ours: the FixMatch
LightningModule driven by ``lightning.Trainer`` as ``ssl-kvasir fit`` drives it (CSV logger, no progress
bar). Both start from the same weights and consume the same pre-built in-memory batches, so data loading is
excluded from both; the two end in the same weights, which is printed as a check that they did the same work.
The two run in lockstep: after each Lightning step, a callback runs the torch loop's step on the same batch,
so both see the same load of the shared machine; rates are one over the median step time (the median
ignores the steps that another process interrupted; only the ratio matters).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

NUM_CLASSES = 23


def make_batches(
    n: int, batch_size: int, mu: int, image_size: int, num_unlabeled: int, seed: int
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """``n`` FixMatch batches in the DataModule's format (``lb``: weak + label; ``ulb``: weak, strong, pos,
    label), filled with seeded noise: the content does not change the work of a step."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, image_size, image_size)
    n_ulb = mu * batch_size
    batches = []
    for _ in range(n):
        batches.append(
            {
                "lb": {
                    "weak": torch.randn(batch_size, *shape, generator=g),  # (B, 3, H, W)
                    "label": torch.randint(0, NUM_CLASSES, (batch_size,), generator=g),  # (B,)
                },
                "ulb": {
                    "weak": torch.randn(n_ulb, *shape, generator=g),  # (mu B, 3, H, W)
                    "strong": torch.randn(n_ulb, *shape, generator=g),  # (mu B, 3, H, W)
                    "pos": torch.randint(0, num_unlabeled, (n_ulb,), generator=g),  # (mu B,)
                    # Half of the pool's images have a known label (the training fold's rest), as in a real run.
                    "label": torch.where(
                        torch.rand(n_ulb, generator=g) < 0.5,
                        torch.randint(0, NUM_CLASSES, (n_ulb,), generator=g),
                        torch.full((n_ulb,), -1),
                    ),  # (mu B,)
                },
            }
        )
    return batches


class Replay:
    """An iterable over pre-built batches (Lightning takes any iterable with a length as a loader)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _fixmatch_kwargs(total_steps: int, lr: float, num_unlabeled: int) -> dict:
    return {
        "class_names": [f"class_{c}" for c in range(NUM_CLASSES)],
        "num_unlabeled": num_unlabeled,
        "labeled_class_counts": [1] * NUM_CLASSES,
        "threshold": 0.95,
        "lambda_u": 1.0,
        "masking": "fixed",
        "alignment": None,
        "teacher": "ema",
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
    """FixMatch with the EMA teacher as a plain torch loop: the baseline.

    Args:
        network: the network to train (trained in place).
        hp: the same hyper-parameters the Lightning module gets.
    """

    def __init__(self, network, hp: dict):
        from ssl_kvasir.methods.base import fixmatch_cosine
        from ssl_kvasir.models import EMA
        from ssl_kvasir.pseudo_labels.masking import FixedThreshold

        self.hp = hp
        self.model = network.train()
        self.ema = EMA(self.model, hp["ema_decay"], hp["ema_warmup"])
        self.masking = FixedThreshold(hp["threshold"])
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": hp["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
        )
        total = hp["max_steps"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: fixmatch_cosine(k, total, 0))
        self.pl_correct, self.pl_total = torch.zeros(NUM_CLASSES), torch.zeros(NUM_CLASSES)

    def step(self, batch: dict) -> None:
        from ssl_kvasir.losses import masked_cross_entropy

        x_lb, y_lb = batch["lb"]["weak"], batch["lb"]["label"]
        ulb = batch["ulb"]
        x_ulb_w, x_ulb_s, idx_ulb, y_ulb = ulb["weak"], ulb["strong"], ulb["pos"], ulb["label"]
        logits_lb, logits_ulb_s = self.model(torch.cat([x_lb, x_ulb_s])).split([len(x_lb), len(x_ulb_s)])
        with torch.no_grad():
            probs_w = self.ema(x_ulb_w).float().softmax(1)  # (mu B, C)
        mask = self.masking(probs_w, idx_ulb)  # (mu B,)
        pseudo = probs_w.argmax(1)  # (mu B,)
        loss_u = masked_cross_entropy(logits_ulb_s, pseudo, mask)
        loss = F.cross_entropy(logits_lb, y_lb) + self.hp["lambda_u"] * loss_u
        known = (y_ulb >= 0) & (mask > 0)
        self.pl_total += torch.bincount(pseudo[known], minlength=NUM_CLASSES)
        self.pl_correct += torch.bincount(pseudo[known & (pseudo == y_ulb)], minlength=NUM_CLASSES)
        if not torch.isfinite(loss):
            raise RuntimeError("the loss diverged")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)


def run_lockstep(lightning_net, torch_net, batches: list[dict], lr: float, num_unlabeled: int):
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

    hp = _fixmatch_kwargs(len(batches), lr, num_unlabeled)
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

    module = FixMatch(network=lightning_net, **hp)
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


def bench(backbone: str, image_size: int, batch_size: int, mu: int, steps: int, warmup: int) -> None:
    from ssl_kvasir.models import build_network

    num_unlabeled = 10_000
    torch.manual_seed(0)
    initial = build_network(backbone, NUM_CLASSES)
    batches = make_batches(warmup + steps, batch_size, mu, image_size, num_unlabeled, seed=0)
    lt, pt, lnet, tnet = run_lockstep(
        copy.deepcopy(initial), copy.deepcopy(initial), batches, 0.03, num_unlabeled
    )
    # The first steps (allocator warm-up, Lightning's first-batch setup) are not timed.
    lt, pt = lt[warmup - 1 :], pt[warmup - 1 :]
    drift = max(
        (a - b).abs().max().item()
        for a, b in zip(lnet.state_dict().values(), tnet.state_dict().values(), strict=True)
        if a.dtype.is_floating_point
    )
    l_ms, t_ms = 1e3 * statistics.median(lt), 1e3 * statistics.median(pt)
    paired = statistics.median(a / b for a, b in zip(lt, pt, strict=True))
    print(
        f"fixmatch step {backbone} {image_size}px B={batch_size} mu={mu}, {len(lt)} timed steps (median): "
        f"torch loop {1e3 / t_ms:6.2f} steps/s ({t_ms:6.1f} ms) | Lightning {1e3 / l_ms:6.2f} steps/s "
        f"({l_ms:6.1f} ms) | Lightning/torch speed {t_ms / l_ms:.3f}x, step time ratio (paired median) "
        f"{paired:.3f}, overhead {l_ms - t_ms:+.1f} ms/step | max weight difference after training {drift:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration, fewer steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's hints about workers and loggers are not what is measured
    import lightning  # noqa: F401 - its import sets its loggers' levels, which are lowered after it

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    configs = [("test_resnet", 32)] if args.quick else [("test_resnet", 32), ("resnet10t", 64)]
    for backbone, size in configs:
        bench(backbone, size, batch_size=16, mu=7, steps=20 if args.quick else 60, warmup=5)


if __name__ == "__main__":
    main()
