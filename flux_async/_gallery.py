"""``DIR/gallery.html``: one self-contained page showing a batch's images and failures.

No external asset of any kind (styles inline, no script, no font, no CDN): the page
opens offline, from the directory, in any browser. Images are referenced by their path
relative to the page (``images/0007-a-red-fox.png``), so the directory can be moved or
zipped as a whole. Lazy loading keeps a page of thousands of images light.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

from ._batch import GENERATED

__all__ = ["render_gallery"]

_UNSAVED: Final = (
    "Generated, but the run ended before its images were saved: rerun the same command "
    "to fetch them from the URLs the manifest keeps (while they last)"
)

_STYLE = """
:root { color-scheme: light dark; --bg: #f6f6f4; --card: #fff; --ink: #1d1d1f;
  --muted: #6b6b70; --line: #e2e2de; --bad: #b3261e; --ok: #1b7f3b; }
@media (prefers-color-scheme: dark) { :root { --bg: #17171a; --card: #222226;
  --ink: #ececef; --muted: #9a9aa2; --line: #333338; --bad: #ff8a80; --ok: #7bd88f; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { padding: 20px 28px 8px; }
h1 { margin: 0 0 4px; font-size: 20px; font-weight: 650; }
h2 { margin: 28px 28px 10px; font-size: 16px; }
.summary { color: var(--muted); }
.summary b.ok { color: var(--ok); } .summary b.bad { color: var(--bad); }
.grid { display: grid; gap: 14px; padding: 12px 28px 28px;
  grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); }
figure { margin: 0; background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; overflow: hidden; }
figure a { display: block; aspect-ratio: 1 / 1; background: var(--line); }
figure img { width: 100%; height: 100%; object-fit: cover; display: block; }
figcaption { padding: 8px 10px 10px; font-size: 12.5px; }
.index { color: var(--muted); font-variant-numeric: tabular-nums; margin-right: 4px; }
.more { color: var(--muted); font-size: 11.5px; }
table { margin: 0 28px 32px; border-collapse: collapse; background: var(--card);
  border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
th, td { text-align: left; padding: 7px 12px; border-top: 1px solid var(--line);
  vertical-align: top; font-size: 12.5px; }
th { border-top: 0; color: var(--muted); font-weight: 600; }
td.error { color: var(--bad); max-width: 70ch; word-break: break-word; }
"""


def _href(path: str) -> str:
    # Relative to the page; quoted so any character of a file name survives.
    return html.escape(urllib.parse.quote(path), quote=True)


def render_gallery(
    records: Mapping[int, Mapping[str, Any]], *, title: str, total: int | None
) -> str:
    """The gallery page for a batch's effective manifest records (index -> last record).

    Every ``ok`` record's files become a captioned tile, in index order; every other
    record (failed, or generated but not saved yet) a row of the table below with its
    error. ``total`` is the input's size (None when unknown, for stdin), for the "not
    run yet" count.

    Example::

        page = render_gallery(effective_records(manifest), title="out", total=500)
        Path("out/gallery.html").write_text(page, "utf-8")
    """
    ok = {i: r for i, r in records.items() if r.get("status") == "ok"}
    others = {i: r for i, r in records.items() if r.get("status") != "ok"}
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)} - flux-async batch</title>",
        f"<style>{_STYLE}</style></head><body>",
        _header(title, ok, others, total),
        _tiles(ok),
        _not_ok_table(others),
        "</body></html>\n",
    ]
    return "".join(parts)


def _header(
    title: str,
    ok: Mapping[int, Mapping[str, Any]],
    others: Mapping[int, Mapping[str, Any]],
    total: int | None,
) -> str:
    """The title and the counts: ok, failed, not saved yet, not run yet."""
    unsaved = sum(1 for r in others.values() if r.get("status") == GENERATED)
    failed = len(others) - unsaved
    pending = None if total is None else max(0, total - len(ok) - len(others))
    parts = [
        f"<header><h1>{html.escape(title)}</h1><div class='summary'>",
        f"<b class='ok'>{len(ok)} ok</b> &middot; <b class='bad'>{failed} failed</b>",
    ]
    if unsaved:
        parts.append(f" &middot; {unsaved} generated, not saved yet")
    if pending:
        parts.append(f" &middot; {pending} not run yet")
    parts.append(
        f" &middot; written {html.escape(time.strftime('%Y-%m-%d %H:%M'))} by flux-async"
        " (rerun the same command to resume or retry)</div></header>"
    )
    return "".join(parts)


def _tiles(ok: Mapping[int, Mapping[str, Any]]) -> str:
    """One captioned tile per image saved, in index order, each linked to its file."""
    if not ok:
        return ""
    esc = html.escape
    parts = ['<section class="grid">']
    for index in sorted(ok):
        record = ok[index]
        prompt = str(record.get("prompt") or "")
        files = [str(f) for f in record.get("files") or ()]
        if not files:
            continue
        alt = esc(prompt, quote=True)
        caption = f'<span class="index">#{index}</span>{esc(prompt)}'
        for number, name in enumerate(files):
            href = _href(name)
            which = (
                f' <span class="more">{number + 1} of {len(files)}</span>' if len(files) > 1 else ""
            )
            parts.append(
                f'<figure><a href="{href}"><img src="{href}" loading="lazy" alt="{alt}"></a>'
                f"<figcaption>{caption}{which}</figcaption></figure>"
            )
    parts.append("</section>")
    return "".join(parts)


def _not_ok_table(others: Mapping[int, Mapping[str, Any]]) -> str:
    """The prompts without images: their error, or that they await a rerun to fetch them."""
    if not others:
        return ""
    esc = html.escape
    unsaved = any(r.get("status") == GENERATED for r in others.values())
    heading = "Failed or not saved yet" if unsaved else "Failed"
    parts = [f"<h2>{heading} ({len(others)})</h2><table>"]
    parts.append("<tr><th>#</th><th>prompt</th><th>error</th></tr>")
    for index in sorted(others):
        record = others[index]
        if record.get("status") == GENERATED:
            text = _UNSAVED
        else:
            error = record.get("error") or {}
            text = f"{error.get('type', 'Error')}: {error.get('message', '')}"
        parts.append(
            f'<tr><td class="index">{index}</td><td>{esc(str(record.get("prompt") or ""))}'
            f'</td><td class="error">{esc(text)}</td></tr>'
        )
    parts.append("</table>")
    return "".join(parts)
