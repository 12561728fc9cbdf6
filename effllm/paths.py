"""Where effllm keeps converted models, built data and figures."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import platformdirs

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of effllm's cache: ``$EFFLLM_CACHE`` or the user cache folder (e.g. ~/.cache/effllm), created if
    needed. A ``ValueError`` that names the path says so when it cannot be used (a file, not creatable, not
    writable)."""
    configured = os.environ.get("EFFLLM_CACHE")
    path = Path(configured or platformdirs.user_cache_dir("effllm")).expanduser()
    where = f"EFFLLM_CACHE={configured!r}" if configured else f"effllm's default cache folder {str(path)!r}"
    fix = ("point EFFLLM_CACHE at a writable folder (e.g. export EFFLLM_CACHE=/tmp/effllm-cache)"
           + (" or unset it to use the user cache folder" if configured else ""))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where} is a file, not a folder: effllm keeps converted models and built data sets "
                         f"there; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{where} cannot be created ({error.strerror or error}); {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{where} is not writable for this user; {fix}")
    return path


def figures_dir() -> Path:
    """Where figures go: ``$EFFLLM_FIGURES`` (run_all.py points it at a staging folder) or figures/."""
    return Path(os.environ.get("EFFLLM_FIGURES") or REPO_ROOT / "figures")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one rename, so that readers
    (and processes writing the same file at once) see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "xb") rather than tempfile.mkstemp: the file gets the permissions any new file gets (the
    # umask's, e.g. 0644), where mkstemp's 0600 would make published figures and reports unreadable to others.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    file = open(temporary, "xb")  # closed by the with below, before the rename
    try:
        with file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
