"""Where effllm keeps converted models, built data and figures."""

from __future__ import annotations

import os
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
