"""`make lab`: JupyterLab on notebooks/ for root too, and a URL to open where no browser can be opened (issue 20).
Checked with `make -n` (print the commands, run nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from effllm.paths import REPO_ROOT


def _lab_commands(**env: str) -> tuple[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    environment.update(env)
    done = subprocess.run(["make", "-n", "lab"], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=60, check=True)
    return next(line for line in done.stdout.splitlines() if "jupyter lab notebooks/" in line), done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_lab_starts_jupyterlab_on_the_notebooks_for_root_and_without_a_display():
    command, printed = _lab_commands()
    assert " --no-browser" in command
    assert "open the URL below" in printed  # the message that says where to point the browser
    assert ("--allow-root" in command) == (os.getuid() == 0)
    with_display, printed = _lab_commands(DISPLAY=":0")
    assert "--no-browser" not in with_display and "open the URL below" not in printed
    assert ("--allow-root" in with_display) == (os.getuid() == 0)
