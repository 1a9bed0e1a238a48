"""MkDocs hook: the site's home page is the README itself.

README.md is the front page on GitHub, where its links into the documentation read ``docs/<page>.md``;
on the site the pages sit one folder up, so the home page is the README with that prefix dropped
(a snippet include could not rewrite them, and MkDocs checks links before any later hook)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return README.read_text(encoding="utf-8").replace("](docs/", "](")
