"""The README's config reference is the schema's own documentation."""

from poptrain.reference import readme_with_reference
from tests.conftest import REPO


def test_readme_config_reference_is_generated_from_the_schema():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme == readme_with_reference(readme), "run `python -m poptrain.reference README.md` to refresh it"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text(encoding="utf-8")
