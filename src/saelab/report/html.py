"""Static, self-contained pages: one HTML document with inline CSS and inline SVG plots (open it
from disk, nothing is fetched), every string from a corpus, a config or a ledger note escaped.

`page()` wraps a body in the document every saelab page shares (title, charset, viewport and
description meta tags, the stylesheet); `Doc` builds the body and its markdown twin side by side,
so the two never disagree."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1200px;padding:0 20px 60px;color:#1b1f24}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:20px 0 6px}table{border-collapse:collapse;margin:8px 0;font-size:12.5px}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#57606a}.figs{display:flex;flex-wrap:wrap;gap:12px}
.fig svg{max-width:100%;height:auto}.verdict{font-weight:600}nav a{margin-right:12px}
code{background:#f6f8fa;padding:0 3px;border-radius:3px}.wrap{overflow-x:auto}.missing{color:#9a6700}
"""


def esc(x: Any) -> str:
    """Text for HTML: every character that could open a tag or close an attribute is escaped."""
    return html.escape("" if x is None else str(x), quote=True)


def slug(text: str) -> str:
    """An id for an anchor: letters, digits and '-' only."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def page(title: str, body: str, description: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta name=\"description\" content=\"{esc(description)}\">\n<title>{esc(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _md_cell(x: Any) -> str:
    return str("" if x is None else x).replace("|", "\\|").replace("\n", " ")


@dataclass
class Doc:
    """A page body in HTML and in markdown at once. Figures are inline SVG in the HTML and files
    (`files[name] = svg`) the markdown links to."""

    files_dir: str = "figures"
    html_parts: list[str] = field(default_factory=list)
    md_parts: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{esc(anchor)}"' if anchor else ""
        self.html_parts.append(f"<h{level}{a}>{esc(text)}</h{level}>")
        self.md_parts.append(f"{'#' * level} {text}" + (f' <a id="{anchor}"></a>' if anchor else ""))

    def text(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html_parts.append(f"<p{c}>{esc(text)}</p>")
        self.md_parts.append(text)

    def raw(self, html_text: str, md_text: str) -> None:
        """Markup the caller built from escaped parts (links, navigation)."""
        self.html_parts.append(html_text)
        self.md_parts.append(md_text)

    def table(self, headers: list[str], rows: list[list[Any]], links: dict[int, str] | None = None,
              numeric: set[int] | None = None) -> None:
        """rows of cells; links: column -> anchor prefix (the cell text links to #<prefix><slug>)."""
        links, numeric = links or {}, numeric or set()
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        out = [f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>']
        for r in rows:
            cells = []
            for i, v in enumerate(r):
                inner = esc(v)
                if i in links and v not in (None, ""):
                    inner = f'<a href="#{esc(links[i] + slug(str(v)))}">{inner}</a>'
                td = '<td class="num">' if i in numeric else "<td>"
                cells.append(f"{td}{inner}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table></div>")
        self.html_parts.append("".join(out))
        md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows]
        self.md_parts.append("\n".join(md))

    def figures(self, figs: list[tuple[str, str | None]]) -> None:
        """(name, svg or None) pairs: drawn side by side; a missing one is named as missing."""
        shown = [(n, s) for n, s in figs if s]
        if shown:
            self.html_parts.append('<div class="figs">' + "".join(
                f'<figure class="fig" id="{esc("fig-" + slug(n))}">{s}<figcaption class="muted">{esc(n)}'
                "</figcaption></figure>" for n, s in shown) + "</div>")
            for n, s in shown:
                name = f"{slug(n)}.svg"
                self.files[name] = s
                self.md_parts.append(f"![{n}]({self.files_dir}/{name})")

    def html(self) -> str:
        return "\n".join(self.html_parts)

    def markdown(self) -> str:
        return "\n\n".join(self.md_parts) + "\n"
