"""The profile files (effllm/runner/profiles/*.yaml): every key names a notebook that exists and every
parameter is one that notebook declares, so a typo in a YAML file fails here instead of being dropped."""

from __future__ import annotations

import re
import sys

import pytest

from effllm import zeroshot
from effllm.runner import PROFILES, REPO_ROOT, declared_parameters, discover_notebooks, load_profiles
from effllm.runner.profiles import (
    PROFILE_ENVIRONMENTS,
    ProfileError,
    parse_profile,
    profile_files,
    read_profile,
    resolve_profiles,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

NOTEBOOKS = {p.stem: p for p in discover_notebooks(REPO_ROOT / "notebooks")}
DECLARED = {stem: set(declared_parameters(path)) for stem, path in NOTEBOOKS.items()}


def test_the_profiles_are_files():
    assert list(profile_files()) == ["smoke", "default", "paper", "paper-standins"]
    assert {name: table["common"]["model_name"] for name, table in load_profiles().items()} == {
        "smoke": "tiny-llama", "default": "smollm2-135m", "paper": "meta-llama/Llama-3.2-1B",
        "paper-standins": "meta-llama/Llama-3.2-1B"}
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
    ("extends: [paper]\n", "'extends' must name another profile"),
    ("environment: [EFFLLM_STANDINS]\n", "'environment' must be a mapping"),
    ("environment: {EFFLLM_STANDINS: 1}\n", 'quote it, e.g. EFFLLM_STANDINS: "1"'),
    ("environment: {1X: \"1\"}\n", "variable names are letters"),
    ("environment: {EFFLLM_FIGURES: /tmp}\n", "EFFLLM_FIGURES is set by run_all.py"),
    ("settings: {a: 1}\n", "nor one of extends, environment"),
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


# ---------------------------------------------------------------------------------------------------------
# extends and environment


def _files(**texts):
    return {name: read_profile(text, f"profiles/{name}.yaml") for name, text in texts.items()}


def test_extends_takes_the_parents_parameters_then_its_own():
    tables, environments = resolve_profiles(_files(
        base="environment: {A: '1', B: '2'}\ncommon: {model_name: big, seed: 0, device: cuda}\n"
             "00_x: {device: cuda, dtype: bfloat16, n: 100, k: 5}\n01_y: {n: 7}\n",
        child="extends: base\nenvironment: {B: '3', C: '4'}\ncommon: {device: cpu}\n00_x: {n: 2}\n02_z: {n: 1}\n",
    ))
    assert tables["child"] == {
        "common": {"model_name": "big", "seed": 0, "device": "cpu"},
        # the child's common beats the parent's section for the same key; the child's section beats both
        "00_x": {"dtype": "bfloat16", "k": 5, "n": 2},
        "01_y": {"n": 7},
        "02_z": {"n": 1},
    }
    assert tables["base"]["00_x"]["device"] == "cuda"  # the parent is unchanged
    assert environments == {"base": {"A": "1", "B": "2"}, "child": {"A": "1", "B": "3", "C": "4"}}


def test_extends_chains_and_refuses_unknown_parents_and_cycles():
    tables, environments = resolve_profiles(_files(a="common: {n: 1, m: 1}\n", b="extends: a\ncommon: {m: 2}\n",
                                                   c="extends: b\nenvironment: {X: y}\ncommon: {k: 3}\n"))
    assert tables["c"]["common"] == {"n": 1, "m": 2, "k": 3} and environments["c"] == {"X": "y"}
    with pytest.raises(ProfileError, match=r"profiles/b.yaml: extends 'nope', which is not a profile; profiles: a, b"):
        resolve_profiles(_files(a="{}\n", b="extends: nope\n"))
    with pytest.raises(ProfileError, match=r"goes round in a circle \(a -> b -> a\)"):
        resolve_profiles(_files(a="extends: b\n", b="extends: a\n"))
    with pytest.raises(ProfileError, match="circle"):
        resolve_profiles(_files(a="extends: a\n"))


def test_paper_standins_is_the_paper_profile_on_a_cpu_with_standins():
    """paper-standins keeps every model, data set name and setting of paper and changes only sizes (a list of
    settings may become some of them) and the GPU settings: device cuda -> cpu, bfloat16 / float16 -> float32,
    and the exit training's sizes (training_overrides: windows, lengths, steps, never the recipe's losses or data)."""
    paper, standins = PROFILES["paper"], PROFILES["paper-standins"]
    assert PROFILE_ENVIRONMENTS["paper-standins"]["EFFLLM_STANDINS"] == "1"
    assert PROFILE_ENVIRONMENTS["paper"] == {}
    assert set(standins) == set(paper)
    sizes = re.compile(r".*(prompts|tokens|samples|windows|seq_len|prompt_len|sequences|steps|examples|limit|problems|points|"
                       r"min_run_time|rounds|counts|corpora|batch_size)$")
    for stem, section in paper.items():
        merged = {**standins["common"], **standins[stem]}
        for key, value in {**paper["common"], **section}.items():
            if key == "device" and value in ("cuda", "auto"):
                assert merged[key] == "cpu", f"{stem}.{key}"
            elif key == "dtype" and value in ("bfloat16", "float16"):
                assert merged[key] == "float32", f"{stem}.{key}"
            elif key == "zero_shot_tasks":  # lm-eval's hub tasks run on stand-in rows: the paper's own list
                assert merged[key] == value and set(value) <= set(zeroshot.TASKS) | set(zeroshot.HUB_TASKS), stem
            elif isinstance(value, list) and not sizes.fullmatch(key):  # a few of the paper's settings
                assert merged[key] and all(v in value for v in merged[key]), f"{stem}.{key}: {merged[key]!r}"
            elif not sizes.fullmatch(key):
                assert merged[key] == value, f"paper-standins changes {stem}.{key}: {value!r} -> {merged[key]!r}"
    overrides = standins["08_exit_training"]["training_overrides"]
    assert set(overrides) <= {"windows_per_corpus", "seq_len", "heldout_windows_per_corpus", "steps", "batch_tokens",
                              "batch_windows", "eval_every", "checkpoint_every", "warmup_steps", "top_k"}


def test_profile_environment_reaches_every_kernel_and_sweep_run(tmp_path):
    from effllm.runner import build_jobs, build_sweep_jobs, load_sweep

    notebooks = discover_notebooks(REPO_ROOT / "notebooks")
    jobs, _ = build_jobs(notebooks, "paper-standins", tmp_path)
    assert all(job.env["EFFLLM_STANDINS"] == "1" and job.env["EFFLLM_FIGURES"] == str(job.staging_dir)
               for job in jobs)
    assert all("EFFLLM_STANDINS" not in job.env for job in build_jobs(notebooks, "paper", tmp_path)[0])
    sweep = load_sweep(REPO_ROOT / "sweeps" / "wanda_calibration_sets.yaml")
    runs, _ = build_sweep_jobs(sweep, notebooks, "paper-standins", tmp_path)
    assert len(runs) == 52 and all(run.env["EFFLLM_STANDINS"] == "1" for run in runs)
