"""The README's config reference is the schema's own documentation."""

import typing

from pydantic import BaseModel

from poptrain.config import RunConfig
from poptrain.config_docs import readme_with_reference, sections
from tests.conftest import REPO


def test_readme_config_reference_is_generated_from_the_schema():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme == readme_with_reference(readme), "run `python -m poptrain.config_docs README.md` to refresh it"


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
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text(encoding="utf-8")
