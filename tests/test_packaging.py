"""Packaging: the library installs without test tools, and CI runs exactly the README's commands."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
TEST_TOOLS = {"pytest", "pytest-benchmark", "hypothesis"}


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0].lower()


def _bash_block(markdown: str, heading: str) -> list[str]:
    """The command lines (comments stripped) of the first ```bash block under ``## heading``."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line]


def test_test_tools_are_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    assert not runtime & TEST_TOOLS, f"test tools in the runtime dependencies: {runtime & TEST_TOOLS}"
    assert {_name(r) for r in project["optional-dependencies"]["test"]} >= TEST_TOOLS


def test_ci_runs_the_readme_install_and_quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = _bash_block(readme, "Install")
    assert install == ["pip install '.[test]'"]
    assert install[0] in ci
    quickstart = _bash_block(readme, "Quickstart")
    assert quickstart == ["sgr-ext demo", "pytest"]
    assert any(line.endswith("sgr-ext demo)") or line == "sgr-ext demo" for line in ci)
    assert "pytest" in ci
