"""Benchmark: building the prepared cache vs the naive way, images per second at the same worker count.

Baseline ("naive"): open each JPEG with PIL, decode it at full size, ``.convert("RGB")``, resize the shorter
side to ``--size`` and re-encode it as JPEG quality 90 into the same shard files and records.
Ours: ``prepare_cache`` (JPEG DCT-scaled decoding stored as decoded, no second resampling, no redundant mode
conversion, one shard per task).
Both run over the same generated JPEGs (720x576 and 1280x1024, the archive's common sizes), already in the
page cache, with the same process pool kind, worker count and shard size. They run alternately, three rounds
(five in the full form), and the ratio is the median of the rounds' ratios (the machine is shared: only the
ratio is meaningful). A profile in one process then splits an image's cost into decoding and the rest.
Targets (issue 2): 2x at 720x576 and 3.7x at 1280x1024; the closing line is the 1280x1024 one.

Run: ``.venv/bin/python bench/bench_prepare.py [--quick] [--n 300] [--size 256] [--workers N]``.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from harness import best_of, closing_line, paired_medians, parser
from PIL import Image

from ssl_kvasir.data.cache import pool_context, prepare_cache, shrink
from ssl_kvasir.data.decode import decode_image
from ssl_kvasir.data.synth import JPEG_QUALITY, render_image
from ssl_kvasir.files import atomic_write, atomic_write_json

SIZES = ((720, 576), (1280, 1024))
TARGETS = {(720, 576): 2.0, (1280, 1024): 3.7}


def naive_shard(root: str, out_dir: str, index: int, files: list[str], size: int) -> int:
    """The baseline's shard: full decode, convert, resize, encode; written like a cache shard."""
    offsets, lengths, offset = [], [], 0
    with atomic_write(Path(out_dir) / f"shard-{index:05d}.bin", "wb") as f:
        for name in files:
            with Image.open(Path(root) / name) as img:
                rgb = img.convert("RGB")
            w, h = rgb.size
            new = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
            buf = io.BytesIO()
            rgb.resize(new, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            f.write(data)
            offsets.append(offset)
            lengths.append(len(data))
            offset += len(data)
    atomic_write_json(
        Path(out_dir) / f"shard-{index:05d}.idx.json",
        {"files": files, "offsets": offsets, "lengths": lengths},
    )
    return len(files)


def run_naive(root: Path, paths: list[str], out_dir: Path, size: int, workers: int, shard_size: int) -> float:
    """Seconds for the baseline over ``paths``."""
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    shards = [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]
    with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=pool_context()) as pool:
        futures = [
            pool.submit(naive_shard, str(root), str(out_dir), i, s, size) for i, s in enumerate(shards)
        ]
        done = sum(f.result() for f in futures)
    assert done == len(paths)
    return time.perf_counter() - start


def run_ours(root: Path, paths: list[str], out_dir: Path, size: int, workers: int, shard_size: int) -> float:
    """Seconds for ``prepare_cache`` over ``paths``."""
    start = time.perf_counter()
    report = prepare_cache(
        root, paths, out_dir, size=size, workers=workers, shard_size=shard_size, progress=False
    )
    assert report.n_cached == len(paths) and not report.skipped
    return time.perf_counter() - start


def make_images(root: Path, n: int, width: int, height: int) -> list[str]:
    """``n`` synthetic JPEGs of one size; returns their paths relative to ``root``."""
    folder = root / f"{width}x{height}"
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        render_image(i % 23, width, height, np.random.default_rng(i)).save(
            folder / f"{i:05d}.jpg", quality=JPEG_QUALITY
        )
        names.append(f"{folder.name}/{i:05d}.jpg")
    return names


def profile_one_process(root: Path, paths: list[str], size: int) -> str:
    """Milliseconds per image in this process: the naive path (full decode, resize + encode) and ours (DCT-scaled
    decode, encode), best of three passes over the files."""
    data = [(root / rel).read_bytes() for rel in paths]

    def full_decode():
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in data]

    def scaled_decode():
        return [decode_image(b, size, name="bench") for b in data]

    def resize_encode(images):
        for rgb in images:
            w, h = rgb.size
            new = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
            rgb.resize(new, Image.Resampling.BILINEAR).save(io.BytesIO(), "JPEG", quality=90)

    full_s, full = best_of(full_decode)
    naive_rest_s, _ = best_of(lambda: resize_encode(full))
    scaled_s, scaled = best_of(scaled_decode)
    encode_s, _ = best_of(
        lambda: [shrink(img, size).save(io.BytesIO(), "JPEG", quality=90) for img in scaled]
    )
    ms = 1e3 / len(data)
    return (
        f"    one process, ms/image: naive {ms * (full_s + naive_rest_s):5.1f} (full decode {ms * full_s:4.1f}, "
        f"resize + encode {ms * naive_rest_s:4.1f}) | ours {ms * (scaled_s + encode_s):4.1f} (DCT-scaled decode "
        f"{ms * scaled_s:4.1f}, encode {ms * encode_s:4.1f})"
    )


def main() -> None:
    p = parser(__doc__, quick="100 images per size, three rounds")
    p.add_argument("--n", type=int, default=300, help="images per size (default 300)")
    p.add_argument("--size", type=int, default=256, help="cached shorter side (default 256)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)"
    )
    a = p.parse_args()
    n = 100 if a.quick else a.n
    rounds = 3 if a.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        paths = {wh: make_images(tmp / "images", n, *wh) for wh in SIZES}
        for wh in SIZES:  # page cache: both contenders read from memory
            for rel in paths[wh]:
                (tmp / "images" / rel).read_bytes()
        # One shard per worker keeps both contenders' workers busy. A shard's fixed cost (two fsync'ed writes,
        # 10-40 ms on this shared disk) is the same for both, but here it falls on 50-150 images instead of a
        # real cache's 1,024: fewer, larger shards keep its share nearer the real one (it still dilutes ours).
        shard_size = max(1, math.ceil(n / a.workers))
        # A first tiny run pays the one-time costs (imports, first pool) that whoever ran first would pay.
        run_ours(tmp / "images", paths[SIZES[0]][:2], tmp / "warm-up", a.size, a.workers, 1)
        print(
            f"prepare benchmark: {n} images per size -> {a.size} px, {a.workers} workers, shard size "
            f"{shard_size}, {rounds} alternating rounds"
        )
        ratios = {}
        for wh in SIZES:
            out = iter(range(2 * rounds))
            images = tmp / "images"

            def naive(wh=wh, out=out, images=images):
                return run_naive(
                    images, paths[wh], tmp / f"naive-{wh[0]}-{next(out)}", a.size, a.workers, shard_size
                )

            def ours(wh=wh, out=out, images=images):
                return run_ours(
                    images, paths[wh], tmp / f"ours-{wh[0]}-{next(out)}", a.size, a.workers, shard_size
                )

            paired = paired_medians(naive, ours, rounds)
            ratios[wh] = paired.ratio
            print(f"  {wh[0]}x{wh[1]} (target >= {TARGETS[wh]}x):")
            print(f"    naive PIL full decode + convert + resize + encode: {n / paired.median_a:8.0f} img/s")
            print(f"    prepare_cache (DCT-scaled decode):                 {n / paired.median_b:8.0f} img/s")
            print(f"    speed-up (median of the rounds' ratios): {paired.ratio:.2f}x")
            print(profile_one_process(images, paths[wh], a.size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "  ours is mostly libjpeg's entropy decoding of the whole file, which DCT scaling cannot skip; beyond "
        "it: GPU decoding (nvJPEG through torchvision.io.decode_jpeg on a CUDA device)"
    )
    closing_line(
        "prepare", "1280x1024 speed-up over naive", ratios[(1280, 1024)], ">=", TARGETS[(1280, 1024)]
    )


if __name__ == "__main__":
    main()
