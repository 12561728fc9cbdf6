"""Profiles: the parameter sets the notebooks run with, one YAML file each in ``effllm/runner/profiles/``.

A profile file holds ``common`` (parameters every notebook gets) and one mapping per notebook, keyed by the
notebook's stem (``01_early_exit``), whose values override ``common`` for that notebook:

    common: {model_name: smollm2-135m, seed: 0}
    00_quickstart: {max_new_tokens: 64, lens_sequences: 8}

Two optional keys shape a profile from another one and from its surroundings:

    extends: paper                        # start from paper.yaml's parameters, then apply this file's
    environment: {EFFLLM_STANDINS: "1"}   # set in every notebook kernel of this profile (and sweep runs)

With ``extends``, a notebook gets: the parent's ``common`` < the parent's section for it < this file's
``common`` < this file's section for it (a key in this file's ``common`` replaces the parent's value for that
key in every notebook, its per-notebook ones included). ``environment`` is the parent's, then this file's;
names are environment variable names and values strings (quote numbers: ``"1"``).

Only the parameters a notebook declares in its ``parameters`` cell are passed to it (tests/test_profiles.py
fails when a file names a notebook that does not exist or a parameter the notebook does not declare). A new
``NAME.yaml`` here is a new ``--profile NAME``; its figures go to ``build/NAME/figures/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from effllm.paths import REPO_ROOT
from effllm.stamps import STAMP_ENVIRONMENT

PROFILES_PACKAGE = "effllm.runner"
PROFILES_FOLDER = "profiles"
# How --help and error messages list the profiles; a profile file not named here follows by name.
PROFILE_ORDER = ("smoke", "default", "paper", "paper-standins")
# Set by run_all itself for every notebook; neither a profile, a sweep nor -p may set them.
RESERVED_PARAMETERS = ("profile", "figures_dir")
# A profile file's settings besides `common` and the notebook sections.
SETTING_KEYS = ("extends", "environment")
# Set by run_all itself in every kernel (effllm.runner.jobs): a profile's `environment` may not set them.
# (EFFLLM_PROFILE, EFFLLM_COMMIT, EFFLLM_DIRTY: what every artefact's stamp says of the run, effllm.stamps)
RESERVED_ENVIRONMENT = ("EFFLLM_FIGURES", "MPLBACKEND", *STAMP_ENVIRONMENT)
NOTEBOOK_KEY = re.compile(r"[0-9][0-9]_[A-Za-z0-9_]+")
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file, the entry and what is allowed."""


@dataclass(frozen=True)
class ProfileFile:
    """One profile file as written: its parameter table and settings, before ``extends`` is resolved."""

    parameters: dict[str, dict[str, Any]]  # {"common": {...}, "<notebook stem>": {...}}
    extends: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


def profile_files() -> dict[str, Any]:
    """``{name: file}`` for every ``profiles/NAME.yaml`` shipped with the package (importlib.resources, so
    it works from a clone, an editable install and a wheel alike), in `PROFILE_ORDER`, then by name."""
    folder = resources.files(PROFILES_PACKAGE) / PROFILES_FOLDER
    found = {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}
    rank = {name: i for i, name in enumerate(PROFILE_ORDER)}
    return {name: found[name] for name in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))}


def read_profile(text: str, source: str) -> ProfileFile:  # noqa: C901, PLR0912 -- one branch per profile key; to split further
    """Check one profile file's text: its parameter table, ``extends`` and ``environment``."""
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
    extends = raw.pop("extends", None)
    if extends is not None and not (isinstance(extends, str) and PROFILE_NAME.fullmatch(extends)):
        raise fail(f"'extends' must name another profile (e.g. extends: paper); got {extends!r}")
    environment = raw.pop("environment", None) or {}
    if not isinstance(environment, dict):
        raise fail(f"'environment' must be a mapping of variable -> string, e.g. {{EFFLLM_STANDINS: \"1\"}}; "
                   f"got {environment!r}")
    for name, value in environment.items():
        if not isinstance(name, str) or not ENVIRONMENT_NAME.fullmatch(name):
            raise fail(f"environment: variable names are letters, digits and '_' (not first a digit); got {name!r}")
        if name in RESERVED_ENVIRONMENT:
            raise fail(f"environment: {name} is set by run_all.py in every kernel; remove it here")
        if not isinstance(value, str):
            raise fail(f"environment: {name} must be a string; got {value!r} ({type(value).__name__}): quote it, "
                       f"e.g. {name}: \"{value}\"")
    table: dict[str, dict[str, Any]] = {"common": {}}
    for key, section in raw.items():
        if key != "common" and not (isinstance(key, str) and NOTEBOOK_KEY.fullmatch(key)):
            raise fail(f"{key!r} is neither 'common' nor a notebook stem like 01_early_exit, nor one of "
                       f"{', '.join(SETTING_KEYS)}")
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
    return ProfileFile(parameters=table, extends=extends, environment=dict(environment))


def parse_profile(text: str, source: str) -> dict[str, dict[str, Any]]:
    """Check one profile file's text; its own ``{"common": {...}, "<notebook stem>": {...}, ...}`` (without
    what ``extends`` would add: see :func:`resolve_profiles`)."""
    return read_profile(text, source).parameters


def _merge(parent: dict[str, dict[str, Any]], child: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``child``'s parameters over ``parent``'s: a key of the child's ``common`` replaces the parent's value in
    ``common`` and in every notebook section, so that it reaches every notebook; a key of a child's notebook
    section replaces only that notebook's."""
    overridden = set(child["common"])
    table = {"common": {**parent["common"], **child["common"]}}
    for stem in dict.fromkeys([*parent, *child]):
        if stem == "common":
            continue
        inherited = {k: v for k, v in parent.get(stem, {}).items() if k not in overridden}
        table[stem] = {**inherited, **child.get(stem, {})}
    return table


def resolve_profiles(files: dict[str, ProfileFile], source: str = PROFILES_FOLDER
                     ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, str]]]:
    """Resolve ``extends`` chains: ``({profile: parameter table}, {profile: environment})``. Raises
    :class:`ProfileError` for a parent that does not exist or a cycle."""
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    environments: dict[str, dict[str, str]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> None:
        if name in tables:
            return
        spec = files[name]
        if spec.extends is None:
            tables[name], environments[name] = spec.parameters, dict(spec.environment)
            return
        if spec.extends not in files:
            raise ProfileError(f"profile file {source}/{name}.yaml: extends {spec.extends!r}, which is not a "
                               f"profile; profiles: {', '.join(files)}")
        if spec.extends in chain:
            cycle = " -> ".join([*chain, name, spec.extends][chain.index(spec.extends):])
            raise ProfileError(f"profile file {source}/{name}.yaml: 'extends' goes round in a circle ({cycle}); "
                               "a profile may extend only one that does not lead back to it")
        resolve(spec.extends, (*chain, name))
        tables[name] = _merge(tables[spec.extends], spec.parameters)
        environments[name] = {**environments[spec.extends], **spec.environment}

    for name in files:
        resolve(name, ())
    return {name: tables[name] for name in files}, {name: environments[name] for name in files}


def read_profile_files() -> dict[str, ProfileFile]:
    """Every shipped profile file, checked, before ``extends`` is resolved."""
    return {name: read_profile(file.read_text(encoding="utf-8"), f"{PROFILES_FOLDER}/{file.name}")
            for name, file in profile_files().items()}


def load_profiles() -> dict[str, dict[str, dict[str, Any]]]:
    """Every shipped profile, checked and resolved: ``{profile: {"common": {...}, "<notebook stem>": {...}}}``."""
    return resolve_profiles(read_profile_files())[0]


# profile -> {"common": parameters every notebook gets, "<notebook stem>": that notebook's overrides}.
PROFILES, PROFILE_ENVIRONMENTS = resolve_profiles(read_profile_files())


def profile_environment(profile: str) -> dict[str, str]:
    """The environment variables every kernel of ``profile`` gets (a copy; empty for most profiles)."""
    return dict(PROFILE_ENVIRONMENTS.get(profile, {}))


def publish_dir_for(profile: str, build_dir: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Where a profile's figures are published: smoke (and any profile without a folder of its own) under
    build/, never figures/; default in figures/; paper in figures/paper/."""
    folders = {"default": repo_root / "figures", "paper": repo_root / "figures" / "paper"}
    return folders.get(profile, Path(build_dir) / profile / "figures")
