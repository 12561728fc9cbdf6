"""Profiles: the parameter sets the notebooks run with, one YAML file each in ``effllm/runner/profiles/``.

A profile file holds ``common`` (parameters every notebook gets) and one mapping per notebook, keyed by the
notebook's stem (``01_early_exit``), whose values override ``common`` for that notebook:

    common: {model_name: smollm2-135m, seed: 0}
    00_quickstart: {max_new_tokens: 64, lens_sequences: 8}

Only the parameters a notebook declares in its ``parameters`` cell are passed to it (tests/test_profiles.py
fails when a file names a notebook that does not exist or a parameter the notebook does not declare). A new
``NAME.yaml`` here is a new ``--profile NAME``; its figures go to ``build/NAME/figures/``.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from effllm.paths import REPO_ROOT

PROFILES_PACKAGE = "effllm.runner"
PROFILES_FOLDER = "profiles"
# How --help and error messages list the profiles; a profile file not named here follows by name.
PROFILE_ORDER = ("smoke", "default", "paper")
# Set by run_all itself for every notebook; neither a profile, a sweep nor -p may set them.
RESERVED_PARAMETERS = ("profile", "figures_dir")
NOTEBOOK_KEY = re.compile(r"[0-9][0-9]_[A-Za-z0-9_]+")
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file, the entry and what is allowed."""


def profile_files() -> dict[str, Any]:
    """``{name: file}`` for every ``profiles/NAME.yaml`` shipped with the package (importlib.resources, so
    it works from a clone, an editable install and a wheel alike), in `PROFILE_ORDER`, then by name."""
    folder = resources.files(PROFILES_PACKAGE) / PROFILES_FOLDER
    found = {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}
    rank = {name: i for i, name in enumerate(PROFILE_ORDER)}
    return {name: found[name] for name in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))}


def parse_profile(text: str, source: str) -> dict[str, dict[str, Any]]:
    """Check one profile file's text; ``{"common": {...}, "<notebook stem>": {...}, ...}``."""
    def fail(message: str) -> ProfileError:
        return ProfileError(f"profile file {source}: {message}")

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise fail(f"is not valid YAML ({str(error).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise fail(f"must be a mapping of 'common' and notebook stems to parameters; got {type(raw).__name__}")
    table: dict[str, dict[str, Any]] = {"common": {}}
    for key, section in raw.items():
        if key != "common" and not (isinstance(key, str) and NOTEBOOK_KEY.fullmatch(key)):
            raise fail(f"{key!r} is neither 'common' nor a notebook stem like 01_early_exit")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise fail(f"{key} must be a mapping of parameter -> value; got {section!r}")
        for name in section:
            if not isinstance(name, str) or not PARAMETER_NAME.fullmatch(name):
                raise fail(f"{key}: parameter names must be Python names; got {name!r}")
            if name in RESERVED_PARAMETERS:
                raise fail(f"{key}: {name!r} is set by run_all.py (--profile, --figures-dir); remove it here")
        table[key] = dict(section)
    return table


def load_profiles() -> dict[str, dict[str, dict[str, Any]]]:
    """Every shipped profile, checked: ``{profile: {"common": {...}, "<notebook stem>": {...}}}``."""
    return {name: parse_profile(file.read_text(encoding="utf-8"), f"{PROFILES_FOLDER}/{file.name}")
            for name, file in profile_files().items()}


# profile -> {"common": parameters every notebook gets, "<notebook stem>": that notebook's overrides}.
PROFILES: dict[str, dict[str, dict[str, Any]]] = load_profiles()


def publish_dir_for(profile: str, build_dir: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Where a profile's figures are published: smoke (and any profile without a folder of its own) under
    build/, never figures/; default in figures/; paper in figures/paper/."""
    folders = {"default": repo_root / "figures", "paper": repo_root / "figures" / "paper"}
    return folders.get(profile, Path(build_dir) / profile / "figures")
