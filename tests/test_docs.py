"""The documentation: the README is a front page, the site builds with no broken link, and its config
reference is the schema's own documentation."""

import os
import re
import subprocess
import sys
import typing

from pydantic import BaseModel

from poptrain.config import RunConfig
from poptrain.config_docs import PAGE, page_with_reference, sections
from tests.conftest import REPO

README = REPO / "README.md"


def test_the_config_reference_page_is_generated_from_the_schema():
    page = (REPO / PAGE).read_text(encoding="utf-8")
    assert page == page_with_reference(page), "run `python -m poptrain.config_docs` to refresh it"


def test_the_reference_documents_every_part_of_the_schema():
    def models(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models(arg)

    documented = {model for _, model, _ in sections()}
    seen, todo = set(), [RunConfig]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        todo += [m for info in model.model_fields.values() for m in models(info.annotation)]
    assert not {m.__name__ for m in seen - documented}, "add these to poptrain.config_docs.sections()"


def test_ci_runs_exactly_the_readme_test_command():
    readme = README.read_text(encoding="utf-8")
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_is_a_front_page_whose_links_reach_every_page():
    """At most 15 KB, and every page of the site is one click away, by links that work on GitHub
    (relative, to files that exist) as on the site (the home page drops their `docs/`)."""
    readme = README.read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 15 * 1024
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert all((REPO / path).is_file() for path in linked), sorted(p for p in linked if not (REPO / p).is_file())
    pages = {f"docs/{path.relative_to(REPO / 'docs').as_posix()}" for path in (REPO / "docs").rglob("*.md")}
    assert not pages - linked, "the README links to every page"


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the navigation, a missing
    included file (cluster/README.md, benchmarks/README.md, README.md's sections) or an API name
    that does not resolve fails it."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="concepts/"' in home, "the home page's links into docs/ are the site's pages"
    clusters = (tmp_path / "site" / "clusters" / "index.html").read_text(encoding="utf-8")
    assert "Turn token authentication on" in clusters, "cluster/README.md is included, not copied"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="poptrain.driver.population.RunResult"' in api and 'id="poptrain.couplings.base.Coupling.reads"' in api
    assert ":class:<code>" not in api and ":meth:<code>" not in api, "the docstrings' Sphinx roles are not shown as written"
