"""`saelab report --check PATH`: validate a page (or every .html under a folder) as a careful
reviewer would before sharing it: broken internal links and anchors, missing images, invalid
HTML (unclosed or mis-nested elements, duplicate ids), missing title and meta tags, and
anything fetched from the network (a page must open offline). Returns the problems found."""

from __future__ import annotations

import base64
import binascii
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
# SVG elements written self-closing (<path/>) are reported by HTMLParser as start+end: fine
REQUIRED_META = ("charset", "viewport", "description")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, int]] = []
        self.problems: list[str] = []
        self.ids: dict[str, int] = {}
        self.links: list[tuple[str, int]] = []  # (href, line)
        self.images: list[tuple[str, int]] = []
        self.remote: list[tuple[str, int]] = []
        self.meta: set[str] = set()
        self.title = ""
        self._in_title = False
        self.saw_html = False

    def handle_starttag(self, tag, attrs):
        line = self.getpos()[0]
        a = dict(attrs)
        if tag == "html":
            self.saw_html = True
        if "id" in a:
            if a["id"] in self.ids:
                self.problems.append(f"line {line}: duplicate id {a['id']!r} (first at line {self.ids[a['id']]})")
            self.ids.setdefault(a["id"], line)
        if tag == "a" and "name" in a:
            self.ids.setdefault(a["name"], line)
        if tag == "meta":
            if "charset" in a:
                self.meta.add("charset")
            if a.get("name") in ("viewport", "description") and a.get("content"):
                self.meta.add(a["name"])
        if tag == "title":
            self._in_title = True
        for key in ("href", "src", "xlink:href"):
            v = a.get(key)
            if v is None:
                continue
            if tag == "img" and key == "src":
                self.images.append((v, line))
            elif key in ("href", "xlink:href") and tag in ("a", "area", "use", "image"):
                self.links.append((v, line))
            if urlparse(v).scheme in ("http", "https") and tag in ("script", "link", "img", "iframe", "source",
                                                                    "image", "use"):
                self.remote.append((v, line))
        if tag not in VOID:
            self.stack.append((tag, line))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        line = self.getpos()[0]
        if tag in VOID:
            return
        if tag == "title":
            self._in_title = False
        if not self.stack:
            self.problems.append(f"line {line}: </{tag}> closes nothing")
            return
        if self.stack[-1][0] == tag:
            self.stack.pop()
            return
        open_tags = [t for t, _ in self.stack]
        if tag in open_tags:
            while self.stack and self.stack[-1][0] != tag:
                t, at = self.stack.pop()
                if t not in ("p", "li", "td", "th", "tr", "option"):  # HTML closes these implicitly
                    self.problems.append(f"line {at}: <{t}> is not closed before </{tag}> at line {line}")
            self.stack.pop()
        else:
            self.problems.append(f"line {line}: </{tag}> does not match the open <{self.stack[-1][0]}> "
                                 f"(line {self.stack[-1][1]})")

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def check_page(path: str | Path) -> list[str]:
    """Problems of one HTML file, each as 'FILE: line N: what is wrong'."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{path}: cannot be read as UTF-8 text: {e}"]
    p = _Page()
    p.feed(text)
    p.close()
    problems = list(p.problems)
    if not p.saw_html or not text.lstrip().lower().startswith("<!doctype html"):
        problems.append("the page does not start with <!DOCTYPE html> and an <html> element")
    problems += [f"line {line}: <{t}> is never closed" for t, line in p.stack if t not in ("p", "li", "td", "th",
                                                                                           "tr", "option", "body",
                                                                                           "html", "head")]
    if not p.title.strip():
        problems.append("no <title> (or an empty one)")
    problems += [f"no <meta {m}> tag" for m in REQUIRED_META if m not in p.meta]
    for href, line in p.links:
        u = urlparse(href)
        if u.scheme in ("http", "https", "mailto"):
            continue
        if href.startswith("#"):
            if unquote(href[1:]) not in p.ids:
                problems.append(f"line {line}: link to #{href[1:]}, which no element of the page has as its id")
        elif u.scheme in ("", "file"):
            target = (path.parent / unquote(u.path)).resolve()
            if not target.exists():
                problems.append(f"line {line}: link to {href}: {target} does not exist")
            elif u.fragment and target.suffix == ".html" and target != path.resolve():
                ids = _Page()
                ids.feed(target.read_text(encoding="utf-8", errors="replace"))
                if unquote(u.fragment) not in ids.ids:
                    problems.append(f"line {line}: link to {href}: {target.name} has no id {u.fragment!r}")
    for src, line in p.images:
        problems += [f"line {line}: {w}" for w in _image_problem(path, src)]
    problems += [f"line {line}: loads {url} from the network (a page must open offline)" for url, line in p.remote]
    return [f"{path}: {x}" for x in problems]


def _image_problem(page_path: Path, src: str) -> list[str]:
    if not src:
        return ["an <img> without a src"]
    if src.startswith("data:"):
        head, _, data = src.partition(",")
        if ";base64" in head:
            try:
                if not base64.b64decode(data, validate=True):
                    return ["an image data URI holds no bytes"]
            except (binascii.Error, ValueError):
                return ["an image data URI is not valid base64"]
        return []
    u = urlparse(src)
    if u.scheme in ("http", "https"):
        return []  # reported as a network load
    target = (page_path.parent / unquote(u.path)).resolve()
    return [] if target.is_file() else [f"image {src}: {target} does not exist"]


def check(path: str | Path) -> list[str]:
    """Problems of a page, or of every .html file below a folder."""
    path = Path(path)
    if path.is_dir():
        pages = sorted(path.rglob("*.html"))
        if not pages:
            return [f"{path}: no .html file in it"]
        return [x for f in pages for x in check_page(f)]
    if not path.is_file():
        return [f"{path}: no such file"]
    return check_page(path)
