"""Set-up files agree with each other: pyproject.toml, environment.yml, .ci/run, README."""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from effllm import runner

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

ROOT = runner.REPO_ROOT


def normalize(requirement: str) -> str:
    """'Rouge_Score >= 0.1.2' -> 'rouge-score>=0.1.2' (PEP 503 name, no whitespace)."""
    compact = re.sub(r"\s+", "", requirement)
    name, rest = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(.*)", compact).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = {normalize(r) for r in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        expected |= {normalize(r) for r in extra}

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one `- pip:` list"
    actual = {normalize(r) for r in pip_lists[0]}

    assert actual == expected, (
        f"environment.yml pip list and pyproject.toml (dependencies + extras) disagree:\n"
        f"  only in environment.yml: {sorted(actual - expected)}\n"
        f"  only in pyproject.toml:  {sorted(expected - actual)}"
    )


def test_ci_runs_make_test():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert "make test" in commands, f".ci/run must call `make test`; its commands: {commands}"


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("make run", "make test"):
        assert f"`{command}`" in readme or f"\n{command}\n" in readme, f"README.md does not show `{command}`"
