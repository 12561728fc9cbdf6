"""Stamps: which run wrote an artefact (commit, profile, dtype, machine), so that a stale figure is never
published beside fresh ones.

Every file :mod:`effllm.plots` writes gets a sidecar ``<name>.stamp.json`` with the stamp of the run that wrote
it (one sidecar for the ``.pdf`` / ``.png`` / ``.csv`` / ``.html`` of one name; ``files`` lists them); the run
summary of ``run_all.py`` carries the run's stamp under ``"stamp"``:

    {"commit": "4f0c...e1", "dirty": false, "profile": "default", "dtype": "bfloat16",
     "machine": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (avx512_bf16, 2 threads)",
     "model_dtype": "bfloat16", "files": ["01_rollback.csv", "01_rollback.pdf", "01_rollback.png"],
     "written_at": "2026-01-07T07:00:00+00:00"}

The fields compared (:data:`COMPARED`):

- ``commit``: git HEAD of the repository effllm lives in (``"unknown"`` without git); ``dirty``: whether
  tracked files other than generated ones (figures/, results/, build/, notebooks/*.ipynb, README.md) differ from
  it. run_all.py reads both once when it starts and hands them to every kernel (``EFFLLM_COMMIT``,
  ``EFFLLM_DIRTY``), so the notebooks of one run carry the same ones even while someone edits the tree.
- ``profile``: ``EFFLLM_PROFILE`` (run_all.py sets it in every kernel), else what the notebook passed to
  :func:`effllm.experiments.session.open_session` (``profile=``), else ``"interactive"``.
- ``dtype``: the run's precision: what a model loaded without a dtype of its own takes
  (:func:`effllm.models.default_dtype`: ``EFFLLM_DTYPE``, else the hardware rule) on this machine's device. A
  notebook with a precision rule of its own (05: CSR has no bfloat16 on a CPU; the paper profile's float16 for 2:4)
  records what its model actually ran in as ``model_dtype``, which is shown but not compared: the notebooks of one
  run may differ there by design.
- ``machine``: the GPU's name where there is one, else the CPU's model name with its kind (``avx2``, ``avx512``,
  ``avx512_bf16``) and this process's thread count.

``written_at`` and ``files`` are never compared. :func:`check_stamps` decides whether a set of artefacts comes
from one run: the claims report (:func:`effllm.experiments.claims.build_claims`) and the README blocks
(:mod:`effllm.experiments.readme`) refuse to mix stamps.
"""

from __future__ import annotations

import datetime as _datetime
import fnmatch
import json
import os
import platform
import subprocess
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effllm.paths import REPO_ROOT

STAMP_SUFFIX = ".stamp.json"
ARTEFACT_SUFFIXES = (".csv", ".png", ".pdf", ".html", ".svg")  # what a figures folder's stamps cover
PROFILE_ENV, COMMIT_ENV, DIRTY_ENV = "EFFLLM_PROFILE", "EFFLLM_COMMIT", "EFFLLM_DIRTY"
STAMP_ENVIRONMENT = (PROFILE_ENV, COMMIT_ENV, DIRTY_ENV)  # run_all.py sets them in every kernel
COMPARED = ("commit", "dirty", "profile", "dtype", "machine")
UNKNOWN_COMMIT = "unknown"
INTERACTIVE = "interactive"
# Tracked paths a run itself rewrites: a change there does not make the code differ from its commit.
GENERATED_PATHS = ("figures/*", "results/*", "build/*", "notebooks/*.ipynb", "README.md")
UNSTAMPED = "unstamped"
ALLOW_FLAG = "--allow-mixed-stamps"

_context: dict[str, Any] = {"profile": None, "model_dtype": None}
_cache: dict[str, Any] = {}


class MixedStampsError(ValueError):
    """Artefacts that are to be published together come from different runs (or some carry no stamp)."""


class StampWarning(UserWarning):
    """Artefacts accepted without a stamp (written before stamping), or mixed ones written on request."""


# --------------------------------------------------------------------------------------------------
# What a stamp says


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "surrogateescape") if done.returncode == 0 else None


def git_state(root: str | Path = REPO_ROOT) -> tuple[str, bool]:
    """``(commit, dirty)`` of the git repository whose top is ``root`` (effllm's own clone): HEAD, and whether a
    tracked file outside :data:`GENERATED_PATHS` differs from it. ``("unknown", False)`` where ``root`` is not the
    top of a git work tree (an installed wheel, no git)."""
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return UNKNOWN_COMMIT, False
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return UNKNOWN_COMMIT, False
    status = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=no") or ""
    entries = iter(status.split("\0"))
    changed = []
    for entry in entries:
        if len(entry) < 4:
            continue
        changed.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy: the next entry is where it came from
            changed.append(next(entries, ""))
    dirty = any(path and not any(fnmatch.fnmatch(path, pattern) for pattern in GENERATED_PATHS) for path in changed)
    return head.strip(), dirty


def cpu_kind() -> str:
    """``avx512_bf16`` (native bfloat16: AVX-512 BF16 or AMX), ``avx512``, ``avx2``, else the architecture."""
    from effllm.precision import cpu_flags, cpu_supports_bfloat16

    if cpu_supports_bfloat16():
        return "avx512_bf16"
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else (platform.machine() or "unknown")


def machine_description() -> str:
    """The machine of a stamp: the GPU's name, else the CPU's model, kind and this process's thread count."""
    import torch

    from effllm.precision import cpu_model

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({cpu_kind()}, {threads} thread{'s' if threads != 1 else ''})"


def run_dtype() -> str:
    """The run's precision: what :func:`effllm.models.default_dtype` gives this machine's device (the GPU where
    there is one, else the CPU)."""
    import torch

    from effllm.models import default_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(default_dtype(device)).removeprefix("torch.")


def _machine() -> str:
    if "machine" not in _cache:  # once per process (and at every open_session): a timing block's threads must
        _cache["machine"] = machine_description()  # not change what a figure saved inside it says
    return _cache["machine"]


def _git_cached() -> tuple[str, bool]:
    if "git" not in _cache:
        _cache["git"] = git_state()
    return _cache["git"]


def set_context(*, profile: str | None = None, model_dtype: Any = None) -> None:
    """What this process's notebook says about itself (``open_session`` calls it): its ``profile`` parameter and
    the dtype its model runs in. Also reads the commit and the machine again."""
    if profile is not None:
        _context["profile"] = str(profile)
    if model_dtype is not None:
        _context["model_dtype"] = str(model_dtype).removeprefix("torch.")
    _cache.clear()


def reset_context() -> None:
    """Forget :func:`set_context` and the cached commit and machine (tests)."""
    _context.update(profile=None, model_dtype=None)
    _cache.clear()


def run_environment(profile: str, root: str | Path = REPO_ROOT) -> dict[str, str]:
    """The variables run_all.py puts into every kernel of a run of ``profile``: the profile, and the commit and
    dirty flag read once, now."""
    commit, dirty = git_state(root)
    return {PROFILE_ENV: str(profile), COMMIT_ENV: commit, DIRTY_ENV: "1" if dirty else "0"}


def run_stamp(profile: str | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The stamp of what this process writes now (see the module docstring). ``profile`` (run_all.py's own
    summary) wins over ``EFFLLM_PROFILE`` in ``environ`` (default ``os.environ``), which wins over the notebook's."""
    environ = os.environ if environ is None else environ
    if environ.get(COMMIT_ENV):
        commit, dirty = environ[COMMIT_ENV], environ.get(DIRTY_ENV, "0") not in ("", "0", "false", "False")
    else:
        commit, dirty = _git_cached()
    stamp: dict[str, Any] = {
        "commit": commit,
        "dirty": bool(dirty),
        "profile": profile or environ.get(PROFILE_ENV) or _context["profile"] or INTERACTIVE,
        "dtype": run_dtype(),
        "machine": _machine(),
    }
    if _context["model_dtype"]:
        stamp["model_dtype"] = _context["model_dtype"]
    stamp["written_at"] = now()
    return stamp


def now() -> str:
    """A stamp's ``written_at``: the time in UTC, ISO 8601, to the second."""
    return _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Sidecars


def stamp_path(folder: str | Path, name: str) -> Path:
    """The sidecar of the artefacts ``folder/name.*``."""
    return Path(folder) / f"{name}{STAMP_SUFFIX}"


def stamp_bytes(stamp: Mapping[str, Any]) -> bytes:
    return (json.dumps(dict(stamp), indent=1, sort_keys=True) + "\n").encode()


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp in ``path``; None when it is missing, unreadable or not a stamp (counted as unstamped)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if is_stamp(value) else None


def is_stamp(value: Any) -> bool:
    return isinstance(value, dict) and all(key in value for key in COMPARED)


def artefact_name(filename: str) -> str | None:
    """``"01_rollback"`` for ``"01_rollback.png"``; None for a file that is not an artefact (a sidecar, a
    temporary file)."""
    if filename.startswith("."):
        return None
    for suffix in ARTEFACT_SUFFIXES:
        if filename.lower().endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


def folder_stamps(folder: str | Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any] | None]:
    """``{file name: its stamp or None}`` for every artefact directly in ``folder`` (not its sub-folders), except
    the names in ``exclude``. A file its name's sidecar does not list (left over from an earlier run that wrote
    more files under that name) counts as unstamped."""
    folder = Path(folder)
    excluded = set(exclude)
    found: dict[str, dict[str, Any] | None] = {}
    sidecars: dict[str, dict[str, Any] | None] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        name = artefact_name(path.name)
        if name is None or name in excluded or not path.is_file():
            continue
        if name not in sidecars:
            sidecars[name] = read_stamp(stamp_path(folder, name))
        stamp = sidecars[name]
        files = stamp.get("files") if stamp is not None else None
        found[path.name] = stamp if stamp is not None and (files is None or path.name in files) else None
    return found


# --------------------------------------------------------------------------------------------------
# Deciding whether artefacts come from one run


def _key(stamp: Mapping[str, Any] | None, fields: tuple[str, ...]) -> tuple[Any, ...] | str:
    return UNSTAMPED if stamp is None else tuple(stamp.get(f) for f in fields)


def describe(stamp: Mapping[str, Any] | None) -> str:
    """One line: ``commit 4f0c1a2b3c4d (uncommitted changes), profile default, dtype bfloat16, machine ...``."""
    if stamp is None:
        return UNSTAMPED
    commit = str(stamp.get("commit"))
    commit = commit[:12] if commit != UNKNOWN_COMMIT else "unknown (no git)"
    changes = " (uncommitted changes)" if stamp.get("dirty") else ""
    return (f"commit {commit}{changes}, profile {stamp.get('profile')}, dtype {stamp.get('dtype')}, "
            f"machine {stamp.get('machine')}")


def _names(sources: list[str], limit: int = 6) -> str:
    shown = ", ".join(sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")


@dataclass(frozen=True)
class StampCheck:
    """What :func:`check_stamps` found: ``status`` ``"agree"`` (``stamp`` is the common one), ``"unstamped"``
    (no artefact has a stamp), ``"mixed"`` (allowed: ``groups`` says which sources carry which stamp) or
    ``"empty"`` (nothing to check)."""

    status: str
    what: str
    stamp: dict[str, Any] | None = None
    groups: tuple[tuple[str, tuple[str, ...]], ...] = field(default_factory=tuple)

    def line(self) -> str:
        """The one line a report states its stamp in."""
        if self.status == "agree":
            return f"Stamp: {describe(self.stamp)}."
        if self.status == "unstamped":
            return "Stamp: none (written before artefacts were stamped)."
        if self.status == "empty":
            return "Stamp: none (nothing measured yet)."
        return "MIXED STAMPS: " + "; ".join(f"{label} ({_names(list(sources), 3)})" for label, sources in self.groups) \
            + f" (written with {ALLOW_FLAG}: these numbers do not come from one run)."

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "stamp": self.stamp, "line": self.line(),
                "groups": [{"stamp": label, "sources": list(sources)} for label, sources in self.groups]}


def check_stamps(sources: Mapping[str, Mapping[str, Any] | None], what: str, *, allow_mixed: bool = False,
                 ignore: Iterable[str] = ()) -> StampCheck:
    """Whether the artefacts ``sources`` (``{name: stamp or None}``) come from one run: their :data:`COMPARED`
    fields (less ``ignore``) are identical. An unstamped artefact beside stamped ones counts as a stamp of its
    own. All unstamped (artefacts from before stamping) is accepted with a :class:`StampWarning`. Mixed stamps
    raise :class:`MixedStampsError`, naming the groups and the fix, unless ``allow_mixed``."""
    fields = tuple(f for f in COMPARED if f not in set(ignore))
    if not sources:
        return StampCheck("empty", what)
    groups: dict[Any, list[str]] = {}
    first: dict[Any, Mapping[str, Any] | None] = {}
    for name, stamp in sources.items():
        stamp = stamp if is_stamp(stamp) else None
        key = _key(stamp, fields)
        groups.setdefault(key, []).append(name)
        first.setdefault(key, stamp)
    if list(groups) == [UNSTAMPED]:
        warnings.warn(f"{what}: none of the {len(sources)} artefact(s) carries a stamp (written before stamping); "
                      "accepted, but nothing shows that they come from one run (rerun what wrote them, `python run_all.py` "
                      "for figures, to stamp them)", StampWarning, stacklevel=2)
        return StampCheck("unstamped", what)
    if len(groups) == 1:
        (key,) = groups
        return StampCheck("agree", what, stamp=dict(first[key] or {}))
    ordered = sorted(groups, key=lambda k: (k == UNSTAMPED, -len(groups[k])))
    labelled = tuple((describe(first[k]) if k != UNSTAMPED else UNSTAMPED, tuple(groups[k])) for k in ordered)
    stamped = [first[k] for k in ordered if k != UNSTAMPED]
    differing = [f for f in fields if len({json.dumps(s.get(f)) for s in stamped if s is not None}) > 1]
    if UNSTAMPED in groups:
        differing.append("stamped vs unstamped")
    profile = next((s.get("profile") for s in stamped if s and s.get("profile") not in (None, INTERACTIVE)),
                   "default")
    listing = "\n".join(f"  - {label}: {_names(list(names))} ({len(names)})" for label, names in labelled)
    message = (f"{what} come from {len(groups)} different runs (they differ in {', '.join(differing)}):\n{listing}\n"
               f"A stale artefact must not be published beside fresh ones: rerun the whole profile "
               f"(`python run_all.py --profile {profile}`) so that every artefact comes from one run, or pass "
               f"{ALLOW_FLAG} to write anyway with a MIXED STAMPS line.")
    if not allow_mixed:
        raise MixedStampsError(message)
    warnings.warn(message, StampWarning, stacklevel=2)
    return StampCheck("mixed", what, groups=labelled)
