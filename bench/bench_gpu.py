"""GPU benchmark: FixMatch training steps and embedding throughput, float32 against bfloat16 + channels_last.

Baseline: ``precision=32-true`` (Lightning) and a float32 forward for embeddings. Ours: what the configs
recommend on recent GPUs, ``precision=bf16-mixed`` with the network in ``channels_last`` memory format, and the
bf16 autocast + channels_last path of ``ssl-kvasir embed``. Same module code, same seeded in-memory batches (data
loading excluded), run one after the other in this process; the ratio is what counts. On a machine without
CUDA it says so and exits 0.

Target: bf16-mixed + channels_last trains ResNet-50 at 224 px at least 1.3x as fast as float32 (1.53x was
measured on an H200). Without CUDA the closing line says the target was not measured.

Run: ``.venv/bin/python bench/bench_gpu.py [--backbone resnet50] [--image-size 224] [--batch-size 32] [--mu 7]``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings

import torch
from harness import Replay, closing_line, fixmatch_batches, parser

NUM_CLASSES = 23
TARGET = 1.3


def fixmatch_steps_per_s(
    backbone: str, precision: str, channels_last: bool, batches: list, warmup: int
) -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ssl_kvasir.methods import FixMatch
    from ssl_kvasir.models import build_network

    torch.manual_seed(0)
    network = build_network(backbone, NUM_CLASSES)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    module = FixMatch.from_config(
        network,
        class_names=[str(i) for i in range(NUM_CLASSES)],
        num_unlabeled=10_000,
        labeled_class_counts=[1] * NUM_CLASSES,
        max_steps=len(batches),
    )

    class Clock(Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, *args):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            precision=precision,
            max_steps=len(batches),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
            default_root_dir=tmp,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=Replay(batches))
    timed = clock.times[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


@torch.inference_mode()
def embed_images_per_s(backbone: str, bf16: bool, x: torch.Tensor, repeats: int) -> float:
    from ssl_kvasir.models import build_network

    network = build_network(backbone, NUM_CLASSES).cuda().eval()
    if bf16:
        network = network.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for i in range(repeats + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            network.features_and_logits(x)
    torch.cuda.synchronize()
    return repeats * len(x) / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__, quick="20 steps instead of --steps")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    if a.quick:
        a.steps = 20
    what = f"{a.backbone} bf16-mixed + channels_last / float32 training speed"
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (run it on a GPU machine)")
        closing_line("gpu", what, None, ">=", TARGET, unmeasured="no CUDA device")
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.backends.cudnn.benchmark = True
    print(f"GPU benchmark on {torch.cuda.get_device_name()}: {a.backbone} at {a.image_size} px")
    batches = fixmatch_batches(a.steps, a.batch_size, a.mu, a.image_size, num_classes=NUM_CLASSES)
    n_img = a.batch_size * (1 + 2 * a.mu)
    rates = {}
    for name, precision, cl in (
        ("float32 (32-true)", "32-true", False),
        ("bf16-mixed + channels_last", "bf16-mixed", True),
    ):
        rates[name] = fixmatch_steps_per_s(a.backbone, precision, cl, batches, warmup=10)
        print(
            f"  FixMatch step, batch {a.batch_size} + {a.mu}x{a.batch_size} x 2 views, {name:28s}: "
            f"{rates[name]:6.2f} steps/s ({rates[name] * n_img:7.0f} img/s)"
        )
    r = list(rates.values())
    print(f"  ratio bf16-mixed + channels_last / float32: {r[1] / r[0]:.2f}x")
    x = torch.randn(256, 3, a.image_size, a.image_size, device="cuda")
    fp32 = embed_images_per_s(a.backbone, False, x, 20)
    bf16 = embed_images_per_s(a.backbone, True, x, 20)
    print(
        f"  embedding, batch 256: float32 {fp32:8.0f} img/s | bf16 autocast + channels_last {bf16:8.0f} img/s | "
        f"ratio {bf16 / fp32:.2f}x"
    )
    closing_line("gpu", what, r[1] / r[0], ">=", TARGET)


if __name__ == "__main__":
    main()
