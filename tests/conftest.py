"""Shared test set-up: this clone first on sys.path, so its effllm (and run_all.py) are the ones imported, and,
at the top of every run, the versions of the libraries whose APIs effllm follows (CI logs then say what a pass
was run with)."""

import platform
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

REPORTED_PACKAGES = ("torch", "transformers", "datasets", "lm-eval", "accelerate", "tokenizers")


def library_versions() -> dict[str, str]:
    """Installed version of each of REPORTED_PACKAGES ("not installed" when absent)."""
    versions = {}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def versions_line() -> str:
    versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    return f"effllm libraries: python {platform.python_version()}, {versions}"


def pytest_report_header(config):
    return versions_line()


def pytest_sessionstart(session):
    # `make test` runs `pytest -q`, which hides the header (and pytest_report_header with it): say it anyway.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not reporter.showheader:
        reporter.write_line(versions_line())


def pytest_collection_modifyitems(config, items):
    # Every test on an embedded model is also a test of the precision path: `make test` runs the `dtype_paths`
    # tests a second time with EFFLLM_DTYPE set to the dtype this machine would not pick by default.
    import pytest

    for item in items:
        if item.get_closest_marker("embedded") is not None:
            item.add_marker(pytest.mark.dtype_paths)
