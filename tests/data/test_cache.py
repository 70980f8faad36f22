"""Decoding odd files, and the prepared cache: contents, bad files, resume, growth, size checks, CLI."""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from helpers import dead_pid, write_lock
from PIL import Image

from ssl_kvasir.cli import main
from ssl_kvasir.data import cache as cache_module
from ssl_kvasir.data.archive import load_catalog
from ssl_kvasir.data.cache import ImageCache, prepare_cache, shrink
from ssl_kvasir.data.decode import decode_image
from ssl_kvasir.data.synth import render_image, write_image_folder_dataset
from ssl_kvasir.errors import DataError

_ALPHA = np.repeat(
    np.linspace(0, 255, 80).round().astype(np.uint8)[:, None], 96, axis=1
)  # (80, 96) 0 top, 255 bottom


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _picture(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    return render_image(seed % 23, width, height, np.random.default_rng(seed))


def _naive_shrink(img: Image.Image, size: int) -> np.ndarray:
    """Oracle: full-size RGB decode, then one resize of the shorter side to ``size``."""
    w, h = img.size
    s = min(w, h)
    new = (size, round(h * size / s)) if w <= h else (round(w * size / s), size)
    return np.asarray(img.convert("RGB").resize(new, Image.Resampling.LANCZOS), dtype=float)


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of odd and bad image files; returns it and {file name: what is odd about it}."""
    root = tmp_path_factory.mktemp("odd")
    pic = _picture()
    (root / "good.jpg").write_bytes(_jpeg(pic))
    pic.save(root / "png_named.jpg", "PNG")
    (root / "grey.jpg").write_bytes(_jpeg(pic.convert("L")))
    (root / "cmyk.jpg").write_bytes(_jpeg(pic.convert("CMYK")))
    (root / "progressive.jpg").write_bytes(_jpeg(pic, progressive=True))
    palette = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    rgba = pic.convert("RGBA")
    rgba.putalpha(Image.fromarray(_ALPHA))
    rgba.save(root / "rgba.png")
    grey16 = (np.arange(80 * 96, dtype=np.uint16).reshape(80, 96) * 8).astype(np.uint16)  # spans 0..61432
    Image.fromarray(grey16).save(root / "grey16.png")
    whole = _jpeg(_picture(320, 256))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "empty.jpg").write_bytes(b"")
    return root, {
        "good.jpg": "ok",
        "png_named.jpg": "ok",
        "grey.jpg": "ok",
        "cmyk.jpg": "ok",
        "progressive.jpg": "ok",
        "palette.png": "ok",
        "rgba.png": "ok",
        "grey16.png": "ok",
        "truncated.jpg": "truncated",
        "garbage.jpg": "not an image",
        "empty.jpg": "not an image",
        "missing.jpg": "file not found",
    }


def test_decode_converts_every_readable_odd_file(odd_files):
    root, kinds = odd_files
    for name, kind in kinds.items():
        if kind != "ok":
            continue
        img = decode_image(root / name, None, name=name)
        assert (img.mode, img.size) == ("RGB", (96, 80)), name
        assert decode_image((root / name).read_bytes(), None, name=name).tobytes() == img.tobytes()


def test_decode_conversions_keep_the_picture(odd_files):
    root, _ = odd_files
    grey = np.asarray(decode_image(root / "grey.jpg", None, name="grey"), dtype=int)  # (80, 96, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    good = np.asarray(decode_image(root / "good.jpg", None, name="good"), dtype=float)
    cmyk = np.asarray(decode_image(root / "cmyk.jpg", None, name="cmyk"), dtype=float)
    assert np.abs(cmyk - good).mean() < 6
    png = np.asarray(decode_image(root / "png_named.jpg", None, name="png"))
    assert np.array_equal(png, np.asarray(_picture()))  # lossless, decoded as PNG despite its name
    with Image.open(root / "palette.png") as p:
        transparent = np.asarray(p) == 0  # (80, 96) palette index 0 is transparent
    palette = np.asarray(decode_image(root / "palette.png", None, name="palette"))
    assert transparent.any() and (palette[transparent] == 0).all()  # composited onto black
    rgba = np.asarray(decode_image(root / "rgba.png", None, name="rgba"), dtype=float)
    over_black = np.asarray(_picture(), dtype=float) * _ALPHA[..., None] / 255  # (80, 96, 3) oracle
    assert np.abs(rgba - over_black).max() <= 1
    grey16 = np.asarray(decode_image(root / "grey16.png", None, name="g16"), dtype=int)[..., 0]
    expected = np.rint(np.arange(80 * 96).reshape(80, 96) * 8 / 257)
    assert np.array_equal(grey16, expected)  # scaled to 8 bits, not clipped at 255


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", "truncated"),
        ("garbage.jpg", "not an image"),
        ("empty.jpg", "not an image"),
        ("missing.jpg", "not found"),
    ],
)
def test_decode_bad_files_raise_data_error_naming_them(odd_files, name, reason):
    root, _ = odd_files
    with pytest.raises(DataError, match=rf"^archive/{name}: .*{reason}"):
        decode_image(root / name, 64, name=f"archive/{name}")
    if name != "missing.jpg":
        with pytest.raises(DataError, match=reason):
            decode_image((root / name).read_bytes(), None, name=name)


def test_rgb_jpeg_is_not_converted(odd_files, monkeypatch):
    root, _ = odd_files

    def no_convert(self, *args, **kwargs):
        raise AssertionError("convert() called on an RGB image")

    monkeypatch.setattr(Image.Image, "convert", no_convert)
    assert decode_image(root / "good.jpg", 32, name="good").mode == "RGB"


@pytest.mark.parametrize(("width", "height"), [(720, 576), (1280, 1024), (1920, 1072), (332, 487)])
def test_dct_scaled_decode_keeps_the_shorter_side_at_least_min_size(width, height):
    data = _jpeg(_picture(width, height))
    for min_size in (16, 60, 128, 200, 256, 300, 480, 2000):
        img = decode_image(data, min_size, name="x")
        # Oracle: the largest DCT scale 1/s whose real-valued size keeps both sides >= min_size.
        s = next((s for s in (8, 4, 2) if width / s >= min_size and height / s >= min_size), 1)
        assert img.size == (math.ceil(width / s), math.ceil(height / s)), (min_size, img.size)
        assert min(img.size) >= min(min_size, width, height)


def test_dct_scaled_decode_is_close_to_full_decode_and_resize():
    img = _picture(1280, 1024, seed=3)
    fast = decode_image(_jpeg(img), 256, name="x")  # DCT-scaled to 320x256
    assert fast.size == (320, 256)
    slow = _naive_shrink(Image.open(io.BytesIO(_jpeg(img))), 256)
    assert np.abs(np.asarray(fast, dtype=float) - slow).mean() < 3


def _prepare(root, paths, cache_dir, size=64, shard_size=4, **kwargs):
    return prepare_cache(
        root, paths, cache_dir, size=size, workers=1, shard_size=shard_size, progress=False, **kwargs
    )


def _synth_paths(synth_archive: Path, n: int) -> list[str]:
    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    return list(catalog.images.path.iloc[::5][:n])


def test_cache_matches_direct_decode_and_resize(synth_archive, tmp_path):
    paths = _synth_paths(synth_archive, 10)
    report = _prepare(synth_archive, paths, tmp_path / "c", size=64)
    assert (report.n_requested, report.n_cached, report.n_new, report.skipped) == (10, 10, 10, {})
    assert (report.shards_built, report.shards_reused) == (3, 0)
    cache = ImageCache(tmp_path / "c", expected_size=64)
    assert len(cache) == 10 and cache.size == 64 and all(p in cache for p in paths)
    assert cache.paths == sorted(paths)
    for p in paths:
        got = cache.load(p)
        # Stored at the JPEG's DCT scale: the shorter side in [64, 128), the aspect ratio kept.
        assert got.mode == "RGB" and 64 <= min(got.size) < 128
        with Image.open(synth_archive / p) as original:
            expected = _naive_shrink(original, min(got.size))
            assert abs(got.size[0] / got.size[1] - original.size[0] / original.size[1]) < 0.02
        # DCT-scaled decoding is as close to the full-decode-and-resize oracle as another resampling filter;
        # the re-encoding at quality 90 adds about 3 levels of JPEG noise on these noisy pictures.
        shrunk = shrink(decode_image(synth_archive / p, 64, name=p), 64)
        assert shrunk.size == got.size
        assert np.abs(np.asarray(shrunk, dtype=float) - expected).mean() < 2.5, p
        assert np.abs(np.asarray(got, dtype=float) - expected).mean() < 6, p
        assert Image.open(io.BytesIO(cache.read_bytes(p))).format == "JPEG"
    # DCT scaling still applies to cached images: 64 px asked at 32 gives half size.
    assert 32 <= min(cache.load(paths[0], 32).size) < 64
    assert cache.missing([paths[1], "nope.jpg", Path(paths[2]), "a/b.jpg"]) == ["nope.jpg", "a/b.jpg"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["counts"] == {
        "images": 10,
        "skipped": 0,
        "shards": 3,
        "bytes": manifest["counts"]["bytes"],
    }
    assert [s["files"] for s in manifest["shards"]] == [paths[0:4], paths[4:8], paths[8:10]]
    assert manifest["root"] == str(synth_archive.resolve())


def test_cache_converts_odd_files_and_skips_bad_ones(odd_files, tmp_path):
    root, kinds = odd_files
    report = _prepare(root, list(kinds), tmp_path / "c", size=48, shard_size=5)
    bad = {name: reason for name, reason in kinds.items() if reason != "ok"}
    assert sorted(report.skipped) == sorted(bad)
    for name, reason in bad.items():
        assert reason in report.skipped[name]
        assert not report.skipped[name].startswith(name)  # the reason alone, not the name again
    cache = ImageCache(tmp_path / "c")
    assert len(cache) == report.n_cached == len(kinds) - len(bad)
    for name in kinds:
        if name in bad:
            with pytest.raises(DataError, match="skipped"):
                cache.read_bytes(name)
        else:
            img = cache.load(name)
            assert img.mode == "RGB" and 48 <= min(img.size) < 96
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["skipped"] == report.skipped


def _mtimes(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*")}


def test_rerun_rebuilds_only_a_shard_without_record(synth_archive, tmp_path):
    paths = _synth_paths(synth_archive, 16)
    cache_dir = tmp_path / "c"
    _prepare(synth_archive, paths, cache_dir)
    before = _mtimes(cache_dir)
    assert len(before) == 8  # 4 shards, each a .bin and a .idx.json
    (cache_dir / "shard-00002.idx.json").unlink()  # as if killed after writing the data, before the record
    report = _prepare(synth_archive, paths, cache_dir)
    assert (report.shards_built, report.shards_reused, report.n_new) == (1, 3, 4)
    after = _mtimes(cache_dir)
    for name, mtime in before.items():
        assert (after[name] == mtime) == (not name.startswith("shard-00002")), name
    assert len(ImageCache(cache_dir)) == 16
    # A corrupt shard (its size no longer matches the record) is rebuilt as well.
    with open(cache_dir / "shard-00001.bin", "ab") as f:
        f.write(b"junk")
    assert _prepare(synth_archive, paths, cache_dir).shards_built == 1
    # A finished cache asked for nothing new is left entirely alone.
    before = _mtimes(cache_dir) | {"manifest": (cache_dir / "manifest.json").stat().st_mtime_ns}
    report = _prepare(synth_archive, paths, cache_dir)
    assert (report.shards_built, report.n_new, report.n_cached) == (0, 0, 16)
    assert before == _mtimes(cache_dir) | {"manifest": (cache_dir / "manifest.json").stat().st_mtime_ns}


def test_killed_build_resumes_with_the_unfinished_shards(synth_archive, tmp_path, monkeypatch):
    paths = _synth_paths(synth_archive, 16)
    cache_dir = tmp_path / "c"
    build, calls = cache_module._build_shard, []

    def killed_on_third_shard(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return build(*args)

    monkeypatch.setattr(cache_module, "_build_shard", killed_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _prepare(synth_archive, paths, cache_dir)
    monkeypatch.setattr(cache_module, "_build_shard", build)
    with pytest.raises(DataError, match="incomplete"):
        ImageCache(cache_dir)
    report = _prepare(synth_archive, paths, cache_dir)
    assert (report.shards_built, report.shards_reused, report.n_new, report.n_cached) == (2, 2, 8, 16)
    cache = ImageCache(cache_dir)
    assert cache.missing(paths) == []


def test_rerun_with_more_paths_adds_them(synth_archive, tmp_path):
    paths = _synth_paths(synth_archive, 14)
    cache_dir = tmp_path / "c"
    _prepare(synth_archive, paths[:8], cache_dir)
    before = _mtimes(cache_dir)
    report = _prepare(synth_archive, paths, cache_dir)
    assert (report.shards_built, report.shards_reused, report.n_new, report.n_cached) == (2, 2, 6, 14)
    assert all(_mtimes(cache_dir)[name] == mtime for name, mtime in before.items())
    assert ImageCache(cache_dir).missing(paths) == []


def test_size_and_folder_mismatches_raise(synth_archive, tmp_path):
    paths = _synth_paths(synth_archive, 2)
    _prepare(synth_archive, paths, tmp_path / "c", size=64)
    with pytest.raises(DataError, match=r"built at 64 px, asked for 32 px"):
        _prepare(synth_archive, paths, tmp_path / "c", size=32)
    with pytest.raises(DataError, match=r"built with quality 90, asked for 80"):
        _prepare(synth_archive, paths, tmp_path / "c", size=64, quality=80)
    with pytest.raises(DataError, match=r"built at 64 px, asked for 128"):
        ImageCache(tmp_path / "c", expected_size=128)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        ImageCache(tmp_path / "empty")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a cache folder"):
        _prepare(synth_archive, paths, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="relative to the archive root"):
        _prepare(synth_archive, ["../elsewhere.jpg"], tmp_path / "c2")


def _read_in_child(cache: ImageCache, paths: list[str], queue) -> None:
    queue.put([cache.read_bytes(p) for p in paths])


def test_cache_pickles_small_and_reads_in_forked_children(synth_archive, tmp_path):
    paths = _synth_paths(synth_archive, 6)
    _prepare(synth_archive, paths, tmp_path / "c")
    cache = ImageCache(tmp_path / "c")
    expected = [cache.read_bytes(p) for p in paths]  # opens shard files in this process
    blob = pickle.dumps(cache)
    assert len(blob) < 4000
    assert [pickle.loads(blob).read_bytes(p) for p in paths] == expected
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(cache, paths, queue))  # inherited, not pickled
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == expected
    assert [cache.read_bytes(p) for p in paths] == expected  # the parent's descriptors still work
    cache.close()


def test_prepare_cli_builds_the_whole_archive(synth_archive, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    split = synth_archive / "2_fold_split.csv"
    args = [
        "prepare",
        "--root",
        str(synth_archive),
        "--cache",
        str(cache_dir),
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main([*args, "--size", "48", "--split-file", str(split), "--shard-size", "64"]) == 0
    out = capsys.readouterr().out
    assert (
        "138 labeled and 60 unlabeled" in out and "198 of 198 images cached" in out and str(cache_dir) in out
    )
    cache = ImageCache(cache_dir, expected_size=48)
    assert len(cache) == 198 and all(48 <= min(cache.load(p).size) < 96 for p in cache.paths[::40])
    assert main([*args, "--size", "48"]) == 0  # no split file needed; nothing left to do
    assert "0 encoded now" in capsys.readouterr().out
    assert main([*args, "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "built at 48 px, asked for 32 px" in err


def test_prepare_cli_folder_source_reports_skipped_files(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 40, 40, 3), dtype=np.uint8)
    out = write_image_folder_dataset(
        tmp_path / "d", images, [0, 1, 0, 1, 0, 1], ["a", "b"], [False] * 4 + [True] * 2
    )
    (out / "labeled" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = [
        "prepare",
        "--root",
        str(out / "labeled"),
        "--unlabeled-root",
        str(out / "unlabeled"),
        "--source",
        "folder",
    ]
    assert (
        main(
            [*args, "--cache", str(tmp_path / "c"), "--size", "32", "--workers", "1", "--generate-folds", "2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "6 of 7 images cached" in printed
        and "1 files skipped" in printed
        and "labeled/a/broken.jpg: " in printed
    )
    cache = ImageCache(tmp_path / "c", expected_size=32)
    assert sorted(cache.paths) == sorted(
        [
            "labeled/a/0.png",
            "labeled/b/1.png",
            "labeled/a/2.png",
            "labeled/b/3.png",
            "unlabeled/4.png",
            "unlabeled/5.png",
        ]
    )


def test_shrink_reduces_by_an_integer_factor_and_never_enlarges():
    assert shrink(Image.new("RGB", (332, 487)), 256).size == (332, 487)  # already in [256, 512)
    assert shrink(Image.new("RGB", (1921, 1072)), 256).size == (481, 268)  # 1072 // 256 = 4
    assert shrink(Image.new("RGB", (1280, 1024)), 256).size == (320, 256)
    small = Image.new("RGB", (40, 30))
    assert shrink(small, 64) is small


def test_prepare_on_a_full_disk_is_one_line_naming_the_shard(synth_archive, tmp_path):
    """A cache folder on a disk that fills up: exit 1 (the machine, not the input), one line naming the shard
    file that could not be written (the OS's message names none), no traceback."""
    import sys

    from helpers import on_a_small_disk

    disk = tmp_path / "small_disk"
    cache = disk / "cache"
    argv = [
        sys.executable,
        "-m",
        "ssl_kvasir.cli",
        "prepare",
        "--root",
        str(synth_archive),
        "--cache",
        str(cache),
    ]
    proc = on_a_small_disk(disk, "256k", [*argv, "--size", "64", "--workers", "0", "--no-progress"])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ssl-kvasir prepare:")]
    assert line.startswith(f"ssl-kvasir prepare: error: [Errno 28] cannot write {cache}/shard-")
    assert line.endswith(".bin: No space left on device")


def test_a_cache_still_being_built_is_not_called_interrupted(synth_archive, tmp_path):
    """An incomplete cache whose lock a live prepare holds is "still being built by" it; once that process
    is gone, the same cache is "interrupted"."""
    import socket
    import subprocess
    import sys

    from ssl_kvasir.files import LOCK_FILE, process_start

    cache_dir = tmp_path / "cache"
    _prepare(synth_archive, _synth_paths(synth_archive, 8), cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    (cache_dir / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    prepare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": prepare.pid, "started": process_start(prepare.pid)}
        lock = {"what": f"ssl-kvasir prepare of {cache_dir}", "since": "05:00:00", **holder}
        (cache_dir / LOCK_FILE).write_text(json.dumps(lock))
        with pytest.raises(
            DataError, match=rf"still being built by ssl-kvasir prepare of .*cache \(pid {prepare.pid} on "
        ):
            ImageCache(cache_dir)
    finally:
        prepare.kill()
        prepare.wait()
    with pytest.raises(
        DataError, match="incomplete \\(its build was interrupted\\): rerun ssl-kvasir prepare"
    ):
        ImageCache(cache_dir)


def test_prepare_without_a_terminal_prints_progress_lines(synth_archive, tmp_path):
    """Output going to a file: a line every 10 % (or 30 s) with the rate and the time left, where a progress
    bar printed nothing."""
    import re
    import subprocess
    import sys

    argv = ["prepare", "--root", str(synth_archive), "--cache", str(tmp_path / "c"), "--size", "32"]
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_kvasir.cli", *argv, "--workers", "0", "--shard-size", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pattern = r"INFO caching at 32 px: \d+ of 198 images \((\d+) %\), [\d,]+ images/s, about \d+ s left"
    shares = [int(m.group(1)) for m in re.finditer(pattern, proc.stderr)]
    assert len(shares) == 9 and shares == sorted(shares), proc.stderr  # 10 % .. 90 %


def test_prepare_rerun_removes_stale_temporary_files(tiny_archive, tmp_path) -> None:
    from ssl_kvasir.data.archive import scan_hyperkvasir
    from ssl_kvasir.data.cache import prepare_cache

    images, _ = scan_hyperkvasir(tiny_archive)
    cache = tmp_path / "cache"
    prepare_cache(tiny_archive, list(images.path), cache, size=32, workers=0, shard_size=40, progress=False)
    # What a prepare killed while writing leaves behind (atomic_write's temporary names), and its lock.
    stale = [cache / ".shard-00001.bin.k2j3h4.tmp", cache / ".shard-00002.idx.json.x8y7.tmp"]
    for path in stale:
        path.write_bytes(b"half a shard")
    write_lock(cache, host=socket.gethostname(), pid=dead_pid(), started=None)
    report = prepare_cache(
        tiny_archive, list(images.path), cache, size=32, workers=0, shard_size=40, progress=False
    )
    assert report.shards_reused == report.shards_built + report.shards_reused  # nothing rebuilt
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # lock released too
