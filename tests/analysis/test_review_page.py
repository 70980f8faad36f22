"""The review page at scale (5,000 images) in a real browser, and its download read back exactly; thumbnails made
once."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ssl_kvasir.analysis.review_page import make_thumbnails, render_review_page, thumbnail_name
from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.pseudo_labels.table import build_pseudo_label_table, read_pseudo_labels

BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_thumbnails_are_small_and_made_once(tmp_path):
    root = tmp_path / "archive"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (1280, 1024), (200, 80, 60)).save(root / "images" / "a.jpg", quality=95)
    Image.new("RGB", (720, 576), (20, 180, 60)).save(root / "images" / "b.jpg", quality=95)
    names = make_thumbnails(root, ["images/a.jpg", "images/b.jpg"], tmp_path / "thumbs", size=96)
    assert names == [thumbnail_name("images/a.jpg", 96), thumbnail_name("images/b.jpg", 96)]
    sizes = [Image.open(tmp_path / "thumbs" / n).size for n in names]
    assert sizes == [(96, 77), (96, 77)]
    stamp = [(tmp_path / "thumbs" / n).stat().st_mtime_ns for n in names]
    make_thumbnails(root, ["images/a.jpg", "images/b.jpg"], tmp_path / "thumbs", size=96)
    assert [(tmp_path / "thumbs" / n).stat().st_mtime_ns for n in names] == stamp


def test_five_thousand_images_page_and_download_exactly(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    if not (Path(BROWSER).exists() and Path(DRIVER).exists()):
        pytest.skip(f"no {BROWSER} and {DRIVER} (apt-get install chromium chromium-driver; .ci/run does)")
    n = 5000
    rng = np.random.default_rng(0)
    table = build_pseudo_label_table(
        [f"unlabeled-images/images/{i:05d},x.jpg" for i in range(n)],  # a comma: the CSV must quote it
        rng.dirichlet(np.full(23, 0.3), size=n),
        knn_probs=rng.dirichlet(np.full(23, 0.3), size=n),
        clusters=rng.integers(-1, 12, size=n),
        outlier_scores=rng.random(n),
        checkpoint="runs/x/checkpoints/best.ckpt",
    )
    page = render_review_page(
        tmp_path / "review" / "index.html",
        table,
        HYPERKVASIR_CLASSES,
        thumbs=[thumbnail_name(p, 128) for p in table.path],
        priority=rng.random(n),
    )
    assert page.stat().st_size < 3_000_000  # the rows as JSON: about 500 bytes an image
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        start = time.perf_counter()
        driver.get(page.as_uri())
        loaded = time.perf_counter() - start
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cards .card")) == 100  # one page in the DOM
        assert driver.find_element(By.ID, "page-info").text == "page 1 of 50 (5000 images)"
        # Thumbnails load lazily: the browser fetches those near the screen only.
        images = driver.find_elements(By.CSS_SELECTOR, "#cards img")
        assert {img.get_attribute("loading") for img in images} == {"lazy"}
        start = time.perf_counter()
        driver.find_element(By.ID, "next").click()
        turned = time.perf_counter() - start
        assert loaded < 10 and turned < 2, (loaded, turned)
        driver.find_element(By.ID, "download").click()
        target = downloads / "reviewed_pseudo_labels.csv"
        deadline = time.monotonic() + 30
        while not target.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        driver.quit()
    # Nothing changed: the download is the table itself, number for number.
    pd.testing.assert_frame_equal(read_pseudo_labels(target), table)
