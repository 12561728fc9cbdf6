#!/usr/bin/env python
"""Run the notebooks headlessly with papermill; regenerate their figures and HTML reports.

    python run_all.py                          # every notebook, default profile -> figures/
    python run_all.py --profile smoke          # tiny sizes, seconds per notebook -> build/smoke/figures/
    python run_all.py --only 00 -p max_new_tokens=32
    python run_all.py --sweep sweeps/wanda_calibration_sets.yaml --executor ray|slurm|local

`python run_all.py --help` lists every option. The code is the package effllm.runner (cli, jobs,
profiles, executors, sweeps, reports); the profiles are effllm/runner/profiles/*.yaml.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# This clone's effllm, even where another copy is installed: `python run_all.py` puts this folder first
# on sys.path, `import run_all` from elsewhere does not.
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from effllm.runner import *  # noqa: E402, F403 (the names run_all.py held before the package existed)
from effllm.runner.cli import main  # noqa: E402

REPO_ROOT = _HERE  # notebooks/, figures/ and build/ are found from here

if __name__ == "__main__":
    sys.exit(main(repo_root=REPO_ROOT))
