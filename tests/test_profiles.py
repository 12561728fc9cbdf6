"""The profile files (effllm/runner/profiles/*.yaml): every key names a notebook that exists and every
parameter is one that notebook declares, so a typo in a YAML file fails here instead of being dropped."""

from __future__ import annotations

import sys

import pytest

from effllm.runner import PROFILES, REPO_ROOT, declared_parameters, discover_notebooks, load_profiles
from effllm.runner.profiles import ProfileError, parse_profile, profile_files

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

NOTEBOOKS = {p.stem: p for p in discover_notebooks(REPO_ROOT / "notebooks")}
DECLARED = {stem: set(declared_parameters(path)) for stem, path in NOTEBOOKS.items()}


def test_the_three_profiles_are_files():
    assert list(profile_files()) == ["smoke", "default", "paper"]
    assert {name: table["common"]["model_name"] for name, table in load_profiles().items()} == {
        "smoke": "tiny-llama", "default": "smollm2-135m", "paper": "meta-llama/Llama-3.2-1B"}
    assert all(table["common"]["seed"] == 0 for table in PROFILES.values())


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_names_existing_notebooks_and_declared_parameters(profile):
    table = load_profiles()[profile]
    unknown = sorted(set(table) - {"common"} - set(NOTEBOOKS))
    assert not unknown, f"{profile}.yaml names notebooks that do not exist: {unknown}; notebooks: {sorted(NOTEBOOKS)}"
    for stem, parameters in table.items():
        if stem == "common":
            for stem_, declared in DECLARED.items():  # common goes to every notebook
                missing = sorted(set(parameters) - declared)
                assert not missing, f"{profile}.yaml common: {stem_} does not declare {missing}"
            continue
        undeclared = sorted(set(parameters) - DECLARED[stem])
        assert not undeclared, (f"{profile}.yaml, {stem}: {undeclared} not declared in the notebook's parameters "
                                f"cell (it declares: {sorted(DECLARED[stem])})")


def test_every_notebook_is_in_every_profile():
    for profile, table in PROFILES.items():
        assert set(NOTEBOOKS) <= set(table), f"{profile}.yaml has no section for {sorted(set(NOTEBOOKS) - set(table))}"


@pytest.mark.parametrize(("text", "expected"), [
    ("common: [1, 2]\n", "common must be a mapping"),
    ("1_quick: {a: 1}\n", "'1_quick' is neither 'common' nor a notebook stem"),
    ("00_quickstart: {figures_dir: x}\n", "'figures_dir' is set by run_all.py"),
    ("00_quickstart: {max-tokens: 3}\n", "parameter names must be Python names"),
    ("common: {a: [1\n", "is not valid YAML"),
])
def test_bad_profile_files_say_what_is_wrong(text, expected):
    with pytest.raises(ProfileError) as error:
        parse_profile(text, "profiles/x.yaml")
    assert expected in str(error.value) and "profiles/x.yaml" in str(error.value)


def test_profile_files_are_package_data():
    """A wheel (not only the clone) carries the YAML files: pyproject.toml names them as package data."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config.get("package-data", {}).get("effllm.runner", [])
    assert "profiles/*.yaml" in patterns, f"package-data for effllm.runner is {patterns}"
