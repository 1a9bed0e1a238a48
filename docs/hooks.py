"""MkDocs hooks (mkdocs.yml ``hooks:``).

* The site's home page is the README itself. README.md is the front page on GitHub, where its links
  into the documentation read ``docs/<page>.md``; on the site the pages sit one folder up, so the home
  page is the README with that prefix dropped (a snippet include could not rewrite them, and MkDocs
  checks links before any later hook).
* poptrain's docstrings name things with Sphinx roles (``:class:`RunConfig```), which mkdocstrings
  shows as written; on the site the role's prefix goes and the name stays in code font.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?=<code>)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return README.read_text(encoding="utf-8").replace("](docs/", "](")


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub("", html)
