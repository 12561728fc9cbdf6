"""Where effllm keeps converted models, built data and figures."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import platformdirs

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of effllm's cache: ``$EFFLLM_CACHE`` or the user cache folder (e.g. ~/.cache/effllm)."""
    path = Path(os.environ.get("EFFLLM_CACHE") or platformdirs.user_cache_dir("effllm"))
    path.mkdir(parents=True, exist_ok=True)
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
