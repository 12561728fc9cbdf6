"""runner.py on small fixture notebooks: parameters, publishing, failures, parallel jobs, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from effllm import runner
from effllm.runner import cli

PARAMETERS_CELL = """\
# %% tags=["parameters"]
profile = "unset"
model_name = "unset"
seed = -1
figures_dir = "unset"
device = "auto"
dtype = None
"""

# Writes what it received (parameters, working folder, kernel environment) and when it ran.
ALPHA = PARAMETERS_CELL + """\
n_items = 1
sleep_s = 0.0

# %%
import json, os, pathlib, time
start = time.time()
time.sleep(sleep_s)
out = pathlib.Path(figures_dir)
(out / "tables").mkdir(parents=True, exist_ok=True)
received = dict(profile=profile, model_name=model_name, seed=seed, n_items=n_items, figures_dir=figures_dir,
                cwd=os.getcwd(), MPLBACKEND=os.environ.get("MPLBACKEND"),
                EFFLLM_FIGURES=os.environ.get("EFFLLM_FIGURES"), EFFLLM_DTYPE=os.environ.get("EFFLLM_DTYPE"),
                start=start, end=time.time())
(out / "alpha.json").write_text(json.dumps(received))
(out / "tables" / "alpha.csv").write_text("x,y\\n1,2\\n")
"""

BETA = PARAMETERS_CELL + """\
sleep_s = 0.0

# %%
import json, pathlib, time
start = time.time()
time.sleep(sleep_s)
(pathlib.Path(figures_dir) / "beta.json").write_text(json.dumps(dict(start=start, end=time.time())))
"""

BROKEN = PARAMETERS_CELL + """\

# %%
import pathlib
(pathlib.Path(figures_dir) / "broken_partial.png").write_bytes(b"half a figure")
raise ValueError("deliberate failure after writing one file")
"""

SLOW = PARAMETERS_CELL + """\

# %%
import time
time.sleep(60)
"""


def write_notebooks(folder: Path, **sources: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, text in sources.items():
        (folder / f"{stem}.py").write_text(textwrap.dedent(text))
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One smoke run over an ok, a second ok and a failing notebook, two at a time."""
    root = tmp_path_factory.mktemp("mixed")
    notebooks = write_notebooks(root / "nb", **{"00_alpha": ALPHA, "01_beta": BETA, "02_broken": BROKEN})
    before = digest(notebooks)
    build = root / "build"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setenv("EFFLLM_DTYPE", "auto")  # --dtype sets it for the run: restored for the other tests
        raise SystemExit(cli.main([
            "--profile", "smoke", "--notebooks-dir", str(notebooks), "--build-dir", str(build),
            "--jobs", "2", "-p", "n_items=3", "--dtype", "bfloat16",
        ]))
    summary = json.loads((build / "smoke" / "summary.json").read_text())
    return dict(root=root, notebooks=notebooks, before=before, build=build, code=exit_info.value.code,
                precision=summary["precision"],
                summary={entry["notebook"]: entry for entry in summary["notebooks"]},
                publish=build / "smoke" / "figures")


def test_profile_parameters_reach_the_notebook(mixed_run):
    received = json.loads((mixed_run["publish"] / "alpha.json").read_text())
    staging = mixed_run["build"] / "smoke" / "staging" / "00_alpha"
    assert received["profile"] == "smoke"
    assert received["model_name"] == runner.PROFILES["smoke"]["common"]["model_name"] == "tiny-llama"
    assert received["seed"] == 0
    assert received["n_items"] == 3  # from -p
    assert Path(received["figures_dir"]) == staging
    assert Path(received["EFFLLM_FIGURES"]) == staging
    # --dtype reaches every kernel and the summary records the run's precision
    assert received["EFFLLM_DTYPE"] == "bfloat16"
    assert mixed_run["precision"]["dtype"] == "bfloat16" and mixed_run["precision"]["dtype_setting"] == "bfloat16"
    assert isinstance(mixed_run["precision"]["cpu_bfloat16"], bool)
    # JupyterLab's inline backend (headless, draws with Agg): figures appear in the executed copy and its report
    assert received["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
    assert Path(received["cwd"]) == mixed_run["notebooks"]


def test_failed_notebook_fails_the_run_and_publishes_nothing(mixed_run):
    assert mixed_run["code"] == 1
    broken = mixed_run["summary"]["02_broken"]
    assert broken["status"] == "failed"
    assert "ValueError" in broken["error"] and "deliberate failure" in broken["error"]
    assert broken["figures"] == [] and broken["report"] is None
    assert not list(mixed_run["publish"].rglob("broken_partial*"))
    assert not list(mixed_run["publish"].rglob("02_broken*"))  # no HTML report of a failed notebook either


def test_succeeding_notebooks_publish_their_files(mixed_run):
    alpha, beta = mixed_run["summary"]["00_alpha"], mixed_run["summary"]["01_beta"]
    assert (alpha["status"], beta["status"]) == ("ok", "ok")
    assert alpha["figures"] == ["alpha.json", "tables/alpha.csv"]
    assert beta["figures"] == ["beta.json"]
    published = sorted(p.relative_to(mixed_run["publish"]).as_posix()
                       for p in mixed_run["publish"].rglob("*") if p.is_file())
    assert published == ["alpha.json", "beta.json", "notebooks/00_alpha.html", "notebooks/01_beta.html",
                         "tables/alpha.csv"]
    assert alpha["report"] == str(mixed_run["publish"] / "notebooks" / "00_alpha.html")
    assert not list((mixed_run["build"] / "smoke" / "staging" / "00_alpha").rglob("*.json"))


def test_executed_copies_go_to_build_and_sources_stay_untouched(mixed_run):
    executed = mixed_run["build"] / "smoke" / "executed"
    # the executed copies, and beside those that succeeded the HTML rendered from them
    assert sorted(p.name for p in executed.iterdir()) == ["00_alpha.html", "00_alpha.ipynb", "01_beta.html",
                                                          "01_beta.ipynb", "02_broken.ipynb"]
    assert digest(mixed_run["notebooks"]) == mixed_run["before"]  # no .ipynb written beside the sources
    injected = [c for c in json.loads((executed / "00_alpha.ipynb").read_text())["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "n_items = 3" in "".join(injected[0]["source"])


def test_progress_lines_and_summary_table(tmp_path, capsys):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA})
    code = cli.main(["--profile", "smoke", "--notebooks-dir", str(notebooks),
                         "--build-dir", str(tmp_path / "build")])
    out = capsys.readouterr().out
    assert code == 0
    assert "[1/1] 00_alpha ok" in out and "2 figures" in out
    assert "notebook" in out and "figures written" in out and "1 ok, 0 failed" in out


def test_two_jobs_run_in_parallel_and_both_succeed(tmp_path):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA, "01_beta": BETA, "02_broken": BROKEN})
    build = tmp_path / "build"
    # Selected by NN prefix and by title; the broken notebook is not selected.
    code = cli.main(["--profile", "smoke", "--notebooks-dir", str(notebooks), "--build-dir", str(build),
                         "--jobs", "2", "--only", "00", "beta", "-p", "sleep_s=2.0"])
    assert code == 0
    summary = json.loads((build / "smoke" / "summary.json").read_text())
    assert [(e["notebook"], e["status"]) for e in summary["notebooks"]] == [("00_alpha", "ok"), ("01_beta", "ok")]
    publish = build / "smoke" / "figures"
    alpha = json.loads((publish / "alpha.json").read_text())
    beta = json.loads((publish / "beta.json").read_text())
    assert alpha["start"] < beta["end"] and beta["start"] < alpha["end"], "the two notebooks did not overlap"


def test_timeout_fails_the_notebook(tmp_path):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_slow": SLOW})
    build = tmp_path / "build"
    code = cli.main(["--profile", "smoke", "--notebooks-dir", str(notebooks), "--build-dir", str(build),
                         "--timeout", "2"])
    assert code == 1
    (entry,) = json.loads((build / "smoke" / "summary.json").read_text())["notebooks"]
    assert entry["status"] == "failed" and "Timeout" in entry["error"]


def test_notebook_without_parameters_cell_fails_with_a_clear_error(tmp_path):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_bare": "# %%\nx = 1\n"})
    (job,), warnings = runner.build_jobs(runner.discover_notebooks(notebooks), "smoke", tmp_path / "build")
    assert any("profile" in w and "00_bare" in w for w in warnings)
    result = runner.run_job(job)
    assert result.status == "failed" and "parameters" in result.error


# ---------------------------------------------------------------------------------------------------------
# Parameters without running anything


@pytest.mark.parametrize("profile", list(runner.PROFILES))
def test_only_declared_parameters_are_passed(tmp_path, profile):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA, "01_beta": BETA})
    jobs, warnings = runner.build_jobs(runner.discover_notebooks(notebooks), profile, tmp_path / "build",
                                        overrides={"n_items": 5, "sleep_s": 0.5})
    alpha, beta = jobs
    common = runner.PROFILES[profile]["common"]
    assert alpha.parameters == {"profile": profile, "model_name": common["model_name"], "seed": 0,
                                "figures_dir": str(alpha.staging_dir), "n_items": 5, "sleep_s": 0.5}
    assert "n_items" not in beta.parameters and beta.parameters["sleep_s"] == 0.5
    assert warnings == []  # every -p key is declared by some selected notebook


def test_publish_folders_per_profile(tmp_path):
    build = tmp_path / "build"
    assert runner.publish_dir_for("smoke", build) == build / "smoke" / "figures"
    assert runner.publish_dir_for("default", build) == runner.REPO_ROOT / "figures"
    assert runner.publish_dir_for("paper", build) == runner.REPO_ROOT / "figures" / "paper"
    assert runner.publish_dir_for("paper-standins", build) == build / "paper-standins" / "figures"  # not figures/
    assert {name: table["common"]["model_name"] for name, table in runner.PROFILES.items()} == {
        "smoke": "tiny-llama", "default": "smollm2-135m", "paper": "meta-llama/Llama-3.2-1B",
        "paper-standins": "meta-llama/Llama-3.2-1B"}


def test_unknown_override_is_warned_about(tmp_path):
    notebooks = write_notebooks(tmp_path / "nb", **{"01_beta": BETA})
    (job,), warnings = runner.build_jobs(runner.discover_notebooks(notebooks), "smoke", tmp_path / "build",
                                          overrides={"max_new_tokns": 3})
    assert "max_new_tokns" not in job.parameters
    assert len(warnings) == 1 and "max_new_tokns" in warnings[0] and "sleep_s" in warnings[0]


def test_list_prints_notebooks_and_runs_nothing(tmp_path, capsys):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA, "01_beta": BETA})
    assert cli.main(["--list", "--profile", "smoke", "--notebooks-dir", str(notebooks),
                         "--build-dir", str(tmp_path / "build")]) == 0
    out = capsys.readouterr().out
    assert "00_alpha" in out and "01_beta" in out and "tiny-llama" in out
    assert not (tmp_path / "build").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit 2 with a message naming what was given and what is allowed


@pytest.fixture
def notebooks(tmp_path):
    return write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA, "01_beta": BETA})


def bad_input(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_profile(capsys, notebooks):
    err = bad_input(capsys, "--profile", "fast", "--notebooks-dir", str(notebooks))
    assert "'fast'" in err and all(name in err for name in ("smoke", "default", "paper"))


def test_unknown_notebook(capsys, notebooks):
    err = bad_input(capsys, "--only", "07", "alpha", "--notebooks-dir", str(notebooks))
    assert "'07'" in err and "00_alpha" in err and "01_beta" in err
    assert "'alpha'" not in err  # only the name that matched nothing is reported


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_bad_jobs(capsys, notebooks, jobs):
    err = bad_input(capsys, "--jobs", jobs, "--notebooks-dir", str(notebooks))
    assert repr(jobs) in err and ">= 1" in err


@pytest.mark.parametrize("timeout", ["2.5", "0", "-3", "soon"])
def test_bad_timeout(capsys, notebooks, timeout):
    err = bad_input(capsys, "--timeout", timeout, "--notebooks-dir", str(notebooks))
    assert repr(timeout) in err and "whole number of seconds >= 1" in err and "fractions" in err


@pytest.mark.parametrize("parameter", ["max_new_tokens", "=3", "two words=1", "prompt=a: b: c"])
def test_malformed_parameter(capsys, notebooks, parameter):
    err = bad_input(capsys, "-p", parameter, "--notebooks-dir", str(notebooks))
    assert repr(parameter) in err and ("KEY=VALUE" in err or "YAML" in err)


def test_reserved_parameter(capsys, notebooks):
    err = bad_input(capsys, "-p", "figures_dir=/tmp/x", "--notebooks-dir", str(notebooks))
    assert "figures_dir" in err and "--figures-dir" in err


def test_no_notebooks(capsys, tmp_path):
    err = bad_input(capsys, "--notebooks-dir", str(tmp_path))
    assert str(tmp_path) in err and "NN_" in err


def test_parameter_values_are_yaml_literals():
    parse = cli._parameter_arg
    assert parse("n=32") == ("n", 32)
    assert parse("lam=0.9") == ("lam", 0.9)
    assert parse("flag=true") == ("flag", True)
    assert parse("model_name=meta-llama/Llama-3.2-1B") == ("model_name", "meta-llama/Llama-3.2-1B")
    assert parse("layers=[4, 8, 12]") == ("layers", [4, 8, 12])
    assert parse('text="a: b"') == ("text", "a: b")


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: a real run_all.py process, interrupted while a notebook's kernel (and a process the
# kernel started) sleeps

SLEEPY = PARAMETERS_CELL + """\
pid_file = "unset"

# %%
import os, pathlib, subprocess, sys, time
(pathlib.Path(figures_dir) / "sleepy_partial.png").write_bytes(b"half a figure")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
pathlib.Path(pid_file).write_text(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet has exited too)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_the_kernel_and_publishes_nothing(tmp_path, signum):
    notebooks = write_notebooks(tmp_path / "nb", **{"00_alpha": ALPHA, "01_sleepy": SLEEPY, "02_beta": BETA})
    build, publish, pid_file = tmp_path / "build", tmp_path / "published", tmp_path / "pids"
    publish.mkdir()
    (publish / "earlier.txt").write_text("from an earlier run")
    process = subprocess.Popen(
        [sys.executable, str(runner.REPO_ROOT / "run_all.py"), "--profile", "smoke", "--notebooks-dir", str(notebooks),
         "--build-dir", str(build), "--figures-dir", str(publish), "-p", f"pid_file={pid_file}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (pid_file.exists() and pid_file.read_text().strip()) and process.poll() is None:
            assert time.monotonic() < deadline, "the sleeping notebook never started"
            time.sleep(0.2)
        kernel_pid, child_pid = map(int, pid_file.read_text().split())
        assert not gone(kernel_pid) and not gone(child_pid)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    summary = json.loads((build / "smoke" / "summary.json").read_text())
    statuses = {e["notebook"]: (e["status"], e["figures"], e["report"]) for e in summary["notebooks"]}
    assert statuses == {"00_alpha": ("ok", ["alpha.json", "tables/alpha.csv"], str(publish / "notebooks" / "00_alpha.html")),
                        "01_sleepy": ("interrupted", [], None), "02_beta": ("not run", [], None)}
    assert summary["interrupted"] is True and summary["ok"] is False
    published = sorted(p.relative_to(publish).as_posix() for p in publish.rglob("*") if p.is_file())
    assert published == ["alpha.json", "earlier.txt", "notebooks/00_alpha.html", "tables/alpha.csv"]
    assert (publish / "earlier.txt").read_text() == "from an earlier run"
    assert "1 ok, 0 failed, 1 interrupted, 1 not run" in output
    deadline = time.monotonic() + 10  # SIGKILL is immediate; allow the kernel's child a moment to be reaped
    while not (gone(kernel_pid) and gone(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(kernel_pid), "the kernel outlived run_all.py"
    assert gone(child_pid), "a process the kernel started outlived run_all.py"


def test_run_all_py_finds_its_clone_from_anywhere(tmp_path):
    """`python /path/to/clone/run_all.py` from another folder, with no PYTHONPATH: the clone's notebooks and its
    own effllm (run_all.py puts its folder first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listed = subprocess.run([sys.executable, str(runner.REPO_ROOT / "run_all.py"), "--list", "--profile", "smoke"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    stems = [line.split()[0] for line in listed.stdout.splitlines()]
    assert stems == [p.stem for p in runner.discover_notebooks(runner.REPO_ROOT / "notebooks")]
    assert not (tmp_path / "build").exists()
