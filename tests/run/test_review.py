"""``ssl-kvasir review``: the review page built through the real CLI, opened in a real browser (Debian's
chromium, driven by Selenium), two labels changed and one image rejected, the reviewed CSV downloaded and fed to
self-training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny

from ssl_kvasir.cli import main

pytestmark = pytest.mark.slow

TINY = tiny()
BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless and offline: no GPU, no sandbox (CI runs as root), no QUIC, no first-run page, no background traffic.
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def _data(archive: Path) -> list[str]:
    return [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]


def _checkpoint(out: Path) -> str:
    path = Path(json.loads((out / "results.json").read_text())["checkpoint"])
    return str(path if path.is_absolute() else out / path)


@pytest.fixture(scope="module")
def checkpoint(synth_archive, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fit")
    assert main(["fit", "method=supervised", f"output_dir={out}", *_data(synth_archive), *TINY]) == 0
    return _checkpoint(out)


def _review_args(checkpoint: str, archive: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint={checkpoint}",
        f"output_dir={out}",
        *_data(archive),
        "data.num_workers=0",
        "umap.n_neighbors=5",
        "umap.exact=true",
        "cluster.min_cluster_size=5",
        *extra,
    ]


def _browser(profile: Path, downloads: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path(BROWSER).exists() and Path(DRIVER).exists()):
        pytest.skip(f"no {BROWSER} and {DRIVER} (apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # a given driver: nothing downloaded
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    return driver


def _wait_for(path: Path, seconds: float = 30.0) -> Path:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not downloaded within {seconds} s"
        time.sleep(0.1)
    return path


def test_review_page_in_a_browser_feeds_self_training(checkpoint, synth_archive, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out = tmp_path / "analysis"
    assert main(["review", *_review_args(checkpoint, synth_archive, out, "review.page_size=25")]) == 0
    page = out / "review" / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere
    thumbs = sorted((out / "review" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 60 and max(t.stat().st_size for t in thumbs) < 20_000
    made = {t.name: t.stat().st_mtime_ns for t in thumbs}
    assert main(["review", *_review_args(checkpoint, synth_archive, out, "review.page_size=25")]) == 0
    assert {
        t.name: t.stat().st_mtime_ns for t in (out / "review" / "thumbs").glob("*.jpg")
    } == made  # made once

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(tmp_path / "profile", downloads)
    try:
        driver.get(page.as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, "#cards .card")
        assert len(cards) == 25  # one page of 60 images
        assert "page 1 of 3 (60 images)" in driver.find_element(By.ID, "page-info").text
        assert driver.find_element(By.ID, "composition").get_attribute("naturalWidth") != "0"
        assert all(
            c.find_element(By.TAG_NAME, "img").get_attribute("src").startswith(page.parent.as_uri())
            for c in cards
        )
        changed = {}
        for card in cards[:2]:
            menu = Select(card.find_element(By.CSS_SELECTOR, "select.label"))
            old = int(menu.first_selected_option.get_attribute("value"))
            menu.select_by_value(str((old + 1) % 23))
            changed[card.find_element(By.TAG_NAME, "img").get_attribute("title")] = (old + 1) % 23
        rejected = cards[2].find_element(By.TAG_NAME, "img").get_attribute("title")
        cards[2].find_element(By.CSS_SELECTOR, "input.reject").click()
        assert driver.find_element(By.ID, "counts").text == "2 changed, 0 confirmed, 1 rejected"
        driver.find_element(By.ID, "next").click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cards .card")) == 25
        Select(driver.find_element(By.ID, "group-by")).select_by_value("cluster")
        assert driver.find_elements(By.CSS_SELECTOR, "h2.group")
        driver.save_screenshot(str(tmp_path / "review_page.png"))
        driver.find_element(By.ID, "download").click()
        reviewed = _wait_for(downloads / "reviewed_pseudo_labels.csv")
    finally:
        driver.quit()
    assert (tmp_path / "review_page.png").stat().st_size > 10_000

    from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
    from ssl_kvasir.pseudo_labels.table import read_pseudo_labels

    table = read_pseudo_labels(reviewed)
    assert len(table) == 59 and rejected not in set(table.path)
    for path, label in changed.items():
        row = table[table.path == path].iloc[0]
        assert row.paper_index == label and row.predicted_class == HYPERKVASIR_CLASSES[label].folder
        assert row.checkpoint == "reviewed" and row.confidence == 1.0

    # Self-training takes the downloaded file as it is: the changed labels are what round 0 trains on.
    from ssl_kvasir.run.train import StageRunner

    stages = []
    fit_stage = StageRunner.fit_stage

    def spy(self, out, pseudo_labeled=None, **kwargs):
        stages.append(pseudo_labeled)
        return fit_stage(self, out, pseudo_labeled=pseudo_labeled, **kwargs)

    monkeypatch.setattr(StageRunner, "fit_stage", spy)
    st = tmp_path / "self_training"
    args = [
        "fit",
        "method=self_training",
        f"method.pseudo.file={reviewed}",
        "method.rounds=1",
        f"output_dir={st}",
    ]
    assert main([*args, *_data(synth_archive), *TINY]) == 0
    from ssl_kvasir.data.archive import load_catalog

    paths = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv").images.path.tolist()
    rows, targets = stages[0]
    assert len(rows) == 59
    labels = {paths[r]: int(t.argmax()) for r, t in zip(rows.tolist(), targets, strict=True)}
    assert all(labels[p] == y for p, y in changed.items()) and rejected not in labels


def test_review_page_holds_the_selection_in_review_order(checkpoint, synth_archive, tmp_path):
    out = tmp_path / "analysis"
    issues = tmp_path / "label_issues.csv"
    # k fits of the tiny network inside the training fold (label-issues takes no checkpoint: fit's keys).
    args = [f"output_dir={out / 'label_issues'}", *_data(synth_archive), *TINY, f"output={issues}"]
    assert main(["label-issues", *args, "label_issues.folds=2"]) == 0
    flagged = pd.read_csv(issues)
    extra = [
        "review.limit=10",
        "cluster.enabled=false",
        "review.group_by=cluster",
        f"review.label_issues={issues}",
    ]
    assert main(["review", *_review_args(checkpoint, synth_archive, out, *extra)]) == 0
    text = (out / "review" / "index.html").read_text()
    # The suspect labels' section: one card per flagged image, with its thumbnail.
    assert f"Suspect labels in the labeled set ({len(flagged)})" in text
    assert text.count('class="card issue"') == len(flagged) > 0
    assert all(p in text for p in flagged.path)
    data = json.loads(text.split('id="review-data">', 1)[1].split("</script>", 1)[0])
    assert len(data["rows"]) == 10 and data["groupBy"] == "cluster"
    # The page's rows are the first of the export's review order.
    export = tmp_path / "export.csv"
    args = _review_args(checkpoint, synth_archive, out, f"output={export}", "select.order=review", *extra)
    assert main(["export-pseudo-labels", *args]) == 0
    ordered = pd.read_csv(export)
    assert [r[1] for r in data["rows"]] == ordered.path.tolist()[:10]
    assert len(ordered) == 60


def test_review_refuses_a_missing_label_issues_file(checkpoint, synth_archive, tmp_path, capsys):
    args = _review_args(checkpoint, synth_archive, tmp_path, f"review.label_issues={tmp_path / 'none.csv'}")
    assert main(["review", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.csv does not exist" in err
