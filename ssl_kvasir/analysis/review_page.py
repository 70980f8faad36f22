"""A review page of pseudo-labels: one static HTML file and a folder of thumbnails, no server, no CDN.

A clinician opens ``index.html`` from a disk or a shared folder. The page shows the composition figure, then
the images in review order, grouped by predicted class or by cluster, a page of cards at a time (thumbnails load
lazily), each with its confidence, kNN vote and cluster. Each image's class can be changed, confirmed or the
image rejected; the edits are kept in the browser's local storage, and "Download" writes the reviewed rows in
the ssl_kvasir pseudo-label CSV format, which ``method.pseudo.file=`` reads as it is. An optional second section
lists suspect labels of the labeled set (``ssl-kvasir label-issues``).

Everything the page needs but the thumbnails is inside the HTML: the rows as JSON, the figure as a data URI,
the script and the style.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_kvasir.data.classes import ClassTable
from ssl_kvasir.errors import DataError
from ssl_kvasir.files import atomic_write_bytes, atomic_write_text
from ssl_kvasir.pseudo_labels.table import PSEUDO_LABEL_COLUMNS

THUMB_DIR = "thumbs"
REVIEWED_SOURCE = "reviewed"
"""The ``checkpoint`` column of a row whose class the clinician confirmed or changed on the page."""
_FIELDS = PSEUDO_LABEL_COLUMNS  # the page's rows and its download: the pseudo-label CSV's columns, in order


def thumbnail_name(path: str, size: int) -> str:
    """The thumbnail's file name: a hash of the image path and the size (the same image, the same name)."""
    return f"{hashlib.sha1(path.encode('utf-8')).hexdigest()[:20]}_{size}.jpg"


def _make_thumbnail(source: Path, target: Path, size: int) -> None:
    from PIL import Image

    with Image.open(source) as image:
        image.draft("RGB", (size, size))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale: most of the saving
        image = image.convert("RGB")
        image.thumbnail((size, size))
        from io import BytesIO

        buffer = BytesIO()
        image.save(buffer, "JPEG", quality=75, optimize=True)
    atomic_write_bytes(target, buffer.getvalue())


def make_thumbnails(
    root: str | os.PathLike,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    size: int = 128,
    workers: int | None = None,
) -> list[str]:
    """Small JPEG thumbnails of images, made once: an existing thumbnail of the same image and size is kept.

    Args:
        root: the archive root the paths are relative to.
        paths: image paths below ``root``.
        out_dir: the thumbnail folder.
        size: the longer side in pixels.
        workers: decoding threads (PIL releases the GIL while decoding); default: every core.

    Returns:
        each image's thumbnail file name, in ``paths`` order.

    Raises:
        DataError: naming the image, when one cannot be read.
    """
    root, out_dir = Path(root), Path(out_dir)
    names = [thumbnail_name(p, size) for p in paths]
    todo = [(root / p, out_dir / n) for p, n in zip(paths, names, strict=True) if not (out_dir / n).exists()]

    def make(job: tuple[Path, Path]) -> None:
        try:
            _make_thumbnail(job[0], job[1], size)
        except (OSError, ValueError) as e:
            raise DataError(f"{job[0]}: cannot make a thumbnail ({e})") from None

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(make, todo))
    return names


def _json_value(value: object) -> object:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def page_rows(table: pd.DataFrame, thumbs: Sequence[str], priority: np.ndarray) -> list[list]:
    """The page's data: one list per row, the pseudo-label columns (in file order), then its thumbnail and
    review priority. ``knn_agrees`` is ``"True"``, ``"False"`` or null, as the CSV spells it."""
    if list(table.columns) != _FIELDS:
        raise DataError(f"the review page needs a pseudo-label table, got columns {list(table.columns)}")
    if not len(table) == len(thumbs) == len(priority):
        raise DataError(f"{len(table)} rows, {len(thumbs)} thumbnails and {len(priority)} priorities")
    agrees = table.knn_agrees.astype("boolean")
    rows = []
    for i, row in enumerate(table.itertuples(index=False)):
        values = [_json_value(v) for v in row]
        values[_FIELDS.index("knn_agrees")] = None if agrees.iloc[i] is pd.NA else str(bool(agrees.iloc[i]))
        rows.append([*values, thumbs[i], round(float(priority[i]), 4)])
    return rows


def _issues_section(issues: pd.DataFrame | None, thumbs: Sequence[str]) -> str:
    if issues is None:
        return ""
    cells = []
    for row, thumb in zip(issues.itertuples(index=False), thumbs, strict=True):
        cells.append(
            f'<div class="card issue"><img loading="lazy" src="{THUMB_DIR}/{html.escape(thumb)}" '
            f'alt="{html.escape(row.filename)}"><div class="meta">#{row.rank} {html.escape(row.path)}<br>'
            f"given <b>{html.escape(row.given_class)}</b>, suggested <b>{html.escape(row.suggested_class)}</b>"
            f"<br>label quality {row.label_quality:.3f}</div></div>"
        )
    return (
        f'<section id="label-issues"><h2>Suspect labels in the labeled set ({len(issues)})</h2>'
        "<p>Labeled training images whose out-of-fold probabilities contradict their label (cleanlab's "
        "confident learning), most suspect first. Correct them in the archive or the split file.</p>"
        f'<div class="grid">{"".join(cells)}</div></section>'
    )


def render_review_page(
    path: str | os.PathLike,
    table: pd.DataFrame,
    classes: ClassTable,
    *,
    thumbs: Sequence[str],
    priority: np.ndarray,
    composition_png: str | os.PathLike | None = None,
    label_issues: pd.DataFrame | None = None,
    issue_thumbs: Sequence[str] = (),
    group_by: str = "class",
    page_size: int = 100,
    title: str = "Pseudo-label review",
) -> Path:
    """Write the review page (atomically); its thumbnails must lie in ``<folder of path>/thumbs/``.

    Args:
        path: the HTML file.
        table: the pseudo-label rows to review, in review order.
        classes: the class table (the class menus).
        thumbs: each row's thumbnail file name (:func:`make_thumbnails`).
        priority: ``(len(table),)`` review priorities, shown on each card.
        composition_png: the composition figure shown at the top (embedded).
        label_issues: suspect labels of the labeled set (columns ``rank``, ``filename``, ``path``,
            ``given_class``, ``suggested_class``, ``label_quality``), shown in their own section.
        issue_thumbs: their thumbnails.
        group_by: the initial grouping, ``class`` or ``cluster`` (the page switches between them).
        page_size: cards per page.
        title: the page title.

    Returns:
        ``path``.
    """
    path = Path(path)
    if group_by not in ("class", "cluster"):
        raise DataError(f"review pages group by class or cluster, got {group_by!r}")
    figure = ""
    if composition_png is not None:
        encoded = base64.b64encode(Path(composition_png).read_bytes()).decode("ascii")
        figure = f'<img id="composition" alt="composition of the unlabeled images" src="data:image/png;base64,{encoded}">'
    payload = {
        "fields": _FIELDS,
        "classes": list(classes.names),
        "rows": page_rows(table, thumbs, priority),
        "groupBy": group_by,
        "pageSize": page_size,
        "thumbDir": THUMB_DIR,
        "reviewedSource": REVIEWED_SOURCE,
        # Edits are stored under this key: a page rebuilt over other rows does not inherit another's edits.
        "storageKey": "ssl-kvasir-review:"
        + hashlib.sha1("\n".join(table.path.astype(str)).encode("utf-8")).hexdigest()[:16],
    }
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    text = (
        _TEMPLATE.replace("%TITLE%", html.escape(title))
        .replace("%N%", str(len(table)))
        .replace("%FIGURE%", figure)
        .replace("%ISSUES%", _issues_section(label_issues, issue_thumbs))
        .replace("%DATA%", data)
        .replace("%SCRIPT%", _SCRIPT)
    )
    atomic_write_text(path, text)
    return path


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font-family:system-ui,sans-serif;margin:0 1rem;color:#222}
header{position:sticky;top:0;background:#fff;padding:.4rem 0;border-bottom:1px solid #ccc;z-index:1}
#composition{max-width:100%;max-height:320px;display:block}
#controls{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;font-size:.9rem}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}
h2.group{width:100%;margin:.8rem 0 .2rem;font-size:1rem;border-bottom:1px solid #ddd}
.card{width:150px;border:2px solid #ddd;border-radius:4px;padding:3px;font-size:.72rem;background:#fafafa}
.card img{width:144px;height:144px;object-fit:contain;background:#000;display:block}
.card select{width:100%;font-size:.72rem}
.card.changed{border-color:#e69500}.card.confirmed{border-color:#2a9d2a}.card.rejected{opacity:.35;border-color:#c00}
.meta{margin:2px 0;line-height:1.25;word-break:break-all}
.disagree{color:#c00;font-weight:bold}
</style></head>
<body>
<header>
<h1 style="font-size:1.2rem;margin:.2rem 0">%TITLE%: %N% images</h1>
<div id="controls">
<label>group by <select id="group-by"><option value="class">predicted class</option><option value="cluster">cluster</option></select></label>
<label>show <select id="group-filter"></select></label>
<button id="prev">&#9664; previous</button><span id="page-info"></span><button id="next">next &#9654;</button>
<label><input type="checkbox" id="only-reviewed"> download only the images I confirmed or changed</label>
<button id="download">Download reviewed CSV</button>
<span id="counts"></span>
</div>
</header>
%FIGURE%
<p style="font-size:.85rem">Cards are in review order within each group (most worth a look first: the classifier unsure,
the kNN vote of the labeled images disagreeing, an outlier; near-duplicates of earlier cards pushed back).
Change a class with its menu, confirm it with &#10003;, or reject the image. The download holds every image not
rejected (or only those you confirmed or changed), in the pseudo-label CSV that
<code>ssl-kvasir fit method=self_training method.pseudo.file=FILE</code> reads. Edits are kept in this browser.</p>
<main id="cards" class="grid"></main>
%ISSUES%
<script type="application/json" id="review-data">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("review-data").textContent);
const F = Object.fromEntries(D.fields.map((f, i) => [f, i]));
const THUMB = D.fields.length, PRIORITY = D.fields.length + 1;
// state[i] = {label, status}: status "" (not looked at), "confirmed", "changed" or "rejected".
let state = {};
try { state = JSON.parse(localStorage.getItem(D.storageKey) || "{}"); } catch (e) { state = {}; }
const save = () => { try { localStorage.setItem(D.storageKey, JSON.stringify(state)); } catch (e) {} };
let page = 0;

function groupOf(row) {
  if (document.getElementById("group-by").value === "cluster") {
    return row[F.cluster] === null ? "no cluster" : row[F.cluster] < 0 ? "noise (-1)" : "cluster " + row[F.cluster];
  }
  return row[F.predicted_class];
}
function groupKey(row) {
  if (document.getElementById("group-by").value === "cluster") {
    return row[F.cluster] === null || row[F.cluster] < 0 ? 1e9 : row[F.cluster];
  }
  return row[F.paper_index];
}
function ordered() {
  const idx = D.rows.map((_, i) => i);
  idx.sort((a, b) => groupKey(D.rows[a]) - groupKey(D.rows[b]) || a - b);  // stable: review order inside a group
  const only = document.getElementById("group-filter").value;
  return only ? idx.filter(i => groupOf(D.rows[i]) === only) : idx;
}
function fillFilter() {
  const sel = document.getElementById("group-filter"), seen = new Map();
  sel.value = "";  // count every group
  for (const i of ordered()) { const g = groupOf(D.rows[i]); seen.set(g, (seen.get(g) || 0) + 1); }
  sel.innerHTML = '<option value="">all groups</option>' +
    [...seen].map(([g, n]) => `<option value="${esc(g)}">${esc(g)} (${n})</option>`).join("");
}
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function label(i) { return state[i] && state[i].label !== undefined ? state[i].label : D.rows[i][F.paper_index]; }
function status(i) { return (state[i] && state[i].status) || ""; }
function card(i) {
  const r = D.rows[i], knn = r[F.knn_class];
  const agree = r[F.knn_agrees] === "False" ? ` <span class="disagree">kNN: ${esc(knn)}</span>` :
    knn ? ` kNN agrees` : "";
  const options = D.classes.map((c, k) => `<option value="${k}"${k === label(i) ? " selected" : ""}>${esc(c)}</option>`).join("");
  return `<div class="card ${status(i)}" data-i="${i}">` +
    `<img loading="lazy" src="${D.thumbDir}/${esc(r[THUMB])}" alt="${esc(r[F.filename])}" title="${esc(r[F.path])}">` +
    `<div class="meta">rank ${i + 1}, priority ${r[PRIORITY].toFixed(2)}<br>confidence ${r[F.confidence].toFixed(3)}${agree}` +
    `<br>cluster ${r[F.cluster] === null ? "-" : r[F.cluster]}</div>` +
    `<select class="label">${options}</select>` +
    `<button class="confirm" title="the class is right">&#10003;</button> ` +
    `<label><input type="checkbox" class="reject"${status(i) === "rejected" ? " checked" : ""}> reject</label></div>`;
}
function render() {
  const idx = ordered(), size = D.pageSize, pages = Math.max(1, Math.ceil(idx.length / size));
  page = Math.min(Math.max(page, 0), pages - 1);
  let out = "", last = null;
  for (const i of idx.slice(page * size, (page + 1) * size)) {
    const g = groupOf(D.rows[i]);
    if (g !== last) { out += `<h2 class="group">${esc(g)}</h2>`; last = g; }
    out += card(i);
  }
  document.getElementById("cards").innerHTML = out;
  document.getElementById("page-info").textContent = `page ${page + 1} of ${pages} (${idx.length} images)`;
  counts();
}
function counts() {
  const n = {confirmed: 0, changed: 0, rejected: 0};
  for (const k in state) if (n[state[k].status] !== undefined) n[state[k].status]++;
  document.getElementById("counts").textContent = `${n.changed} changed, ${n.confirmed} confirmed, ${n.rejected} rejected`;
}
function update(el, change) {
  const c = el.closest(".card"), i = Number(c.dataset.i);
  state[i] = Object.assign({label: label(i), status: status(i)}, change);
  if (state[i].status !== "rejected") {
    state[i].status = state[i].label === D.rows[i][F.paper_index] ? "confirmed" : "changed";
  }
  c.className = "card " + state[i].status;
  save(); counts();
}
document.getElementById("cards").addEventListener("change", e => {
  if (e.target.classList.contains("label")) update(e.target, {label: Number(e.target.value), status: ""});
  if (e.target.classList.contains("reject")) update(e.target, {status: e.target.checked ? "rejected" : ""});
});
document.getElementById("cards").addEventListener("click", e => {
  if (e.target.classList.contains("confirm")) {
    const c = e.target.closest(".card"); c.querySelector(".reject").checked = false; update(e.target, {status: ""});
  }
});
function csvField(v) {
  if (v === null || v === undefined) return "";
  const s = String(v);
  return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}
function reviewedCsv() {
  const only = document.getElementById("only-reviewed").checked, lines = [D.fields.join(",")];
  D.rows.forEach((r, i) => {
    const s = status(i);
    if (s === "rejected" || (only && !s)) return;
    const out = r.slice(0, D.fields.length);
    if (s) {  // a person's label: one-hot, as certain as a label gets
      const k = label(i), name = D.classes[k];
      out[F.predicted_class] = name; out[F.paper_index] = k;
      out[F.confidence] = 1; out[F.margin] = 1; out[F.entropy] = 0;
      out[F.knn_agrees] = r[F.knn_class] ? String(r[F.knn_class] === name ? "True" : "False") : null;
      out[F.checkpoint] = D.reviewedSource;
    }
    lines.push(out.map(csvField).join(","));
  });
  return lines.join("\n") + "\n";
}
document.getElementById("download").addEventListener("click", () => {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([reviewedCsv()], {type: "text/csv"}));
  a.download = "reviewed_pseudo_labels.csv";
  document.body.appendChild(a); a.click(); a.remove();
});
document.getElementById("group-by").addEventListener("change", () => { fillFilter(); page = 0; render(); });
document.getElementById("group-filter").addEventListener("change", () => { page = 0; render(); });
document.getElementById("prev").addEventListener("click", () => { page--; render(); window.scrollTo(0, 0); });
document.getElementById("next").addEventListener("click", () => { page++; render(); window.scrollTo(0, 0); });
document.getElementById("group-by").value = D.groupBy;
fillFilter();
render();
"""
