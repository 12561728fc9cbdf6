"""Shared test set-up: this clone first on sys.path, so its effllm (and run_all.py) are the ones imported."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
