"""The feature dashboard as static files: index.html (one page, hash-routed), the vendored
static/app.js and app.css, data/index.js (every latent's row: the index and the per-latent
join) and data/latents/<id>.js (one latent's page data, loaded only when its page opens, so
the index stays fast with 16k+ latents), and data/join.csv.

Data files are JavaScript (`window.SAELAB_INDEX = {...}`, `SAELAB_LATENT(id, {...})`), not JSON,
because a browser refuses to fetch JSON from a page opened from disk; a <script> may load them.
The page puts every string in the DOM as text (app.js), so corpus text is never parsed as HTML.

This module writes what it is given (SiteData); experiments/dashboard.py gathers it from a run.
The whole site is written to a temp folder and renamed into place, so a crash never leaves a
half-written dashboard."""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from saelab.report.html import esc

INDEX_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="description" content="{description}">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/app.css">
</head>
<body>
<div id="app"><noscript>This dashboard needs JavaScript (nothing is fetched from the internet).</noscript></div>
<script src="data/index.js"></script>
<script src="static/app.js"></script>
</body>
</html>
"""


@dataclass
class Column:
    """One column of the latent table: key in each row, header label, num or text, shown in the
    index (else only in the join view), and a tooltip saying what it is."""

    key: str
    label: str
    kind: str = "num"
    index: bool = False
    help: str = ""


@dataclass
class SiteData:
    """Everything the dashboard shows. rows: one dict per latent (keys of `columns`); latents:
    page data per latent id (stats, hist, lens, top, bands, neighbours, domains, explanation, join)."""

    meta: dict[str, Any]
    columns: list[Column]
    rows: list[dict[str, Any]]
    latents: dict[int, dict[str, Any]] = field(default_factory=dict)


def _js(obj: Any) -> str:
    # ensure_ascii keeps U+2028/9 and any odd byte out of the script text
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _clean(x: Any) -> Any:
    """NaN and infinities as null (JSON has none)."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def join_csv(site: SiteData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([c.key for c in site.columns])
    for r in site.rows:
        w.writerow(["" if r.get(c.key) is None else r.get(c.key) for c in site.columns])
    return buf.getvalue()


def write_site(site: SiteData, out: str | Path) -> Path:
    """Write the dashboard into `out` (replacing an earlier one there); returns out/index.html."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "static").mkdir(parents=True)
    (tmp / "data" / "latents").mkdir(parents=True)
    static = resources.files("saelab.dashboard") / "static"
    for name in ("app.js", "app.css"):
        (tmp / "static" / name).write_bytes((static / name).read_bytes())
    meta = site.meta
    (tmp / "index.html").write_text(INDEX_HTML.format(title=esc(meta.get("title", "saelab dashboard")),
                                                      description=esc(meta.get("subtitle", ""))), encoding="utf-8")
    index = {"meta": meta, "columns": [c.__dict__ for c in site.columns], "rows": site.rows}
    (tmp / "data" / "index.js").write_text(f"window.SAELAB_INDEX = {_js(_clean(index))};\n", encoding="utf-8")
    for i, data in site.latents.items():
        (tmp / "data" / "latents" / f"{int(i)}.js").write_text(f"SAELAB_LATENT({int(i)}, {_js(_clean(data))});\n",
                                                              encoding="utf-8")
    (tmp / "data" / "join.csv").write_text(join_csv(site), encoding="utf-8")
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out / "index.html"
