"""Benchmarks that print a table and write JSON under results/. Compare rows as ratios measured in one run.

    python -m effllm.bench early-exit [--model smollm2-135m] [--prompts 8] [--max-new-tokens 64] [--out FILE]
    python -m effllm.bench --help       (lists every benchmark)

Each benchmark is a module of this package that defines ``NAME`` (the subcommand), ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``; `main` finds them, so a new benchmark is one
new file. Speed is never asserted by tests (these machines are noisy): a benchmark measures its
reference (HF ``generate``, a dense forward pass, ...) in the same run and reports ratios.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

from effllm import io, stamps
from effllm.experiments.timing import device_description  # noqa: F401  (results record the machine)
from effllm.paths import REPO_ROOT


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None, width: int = 14) -> None:
    """A fixed-width table of ``rows`` (floats to 3 decimals, None as '-')."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    print("  ".join(f"{c:>{width}}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, float):
                cells.append(f"{value:>{width}.3f}")
            else:
                cells.append(f"{'-' if value is None else value!s:>{width}}")
        print("  ".join(cells))


def write_result(result: dict[str, Any], out: Path | None, default_name: str) -> Path:
    """Write ``result`` as JSON to ``out`` (default results/<default_name>) atomically (effllm.io.write_json:
    a reader sees the old file or the whole new one), stamped with ``precision`` (effllm.models.dtype_report) and
    ``stamp`` (commit, profile, dtype, machine: effllm.stamps.run_stamp), and say where."""
    from effllm.models import dtype_report

    out = Path(out) if out else REPO_ROOT / "results" / default_name
    # the run's precision setting and the CPU's bfloat16 support beside the dtype the benchmark used
    io.write_json(out, {**result, "precision": dtype_report(), "stamp": stamps.run_stamp()})
    print(f"wrote {out}")
    return out


def benchmarks() -> dict[str, Any]:
    """Subcommand name -> module, for every benchmark module in this package."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found[module.NAME] = module
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effllm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    modules = benchmarks()
    for name, module in modules.items():
        sub_parser = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_parser=sub_parser)
    args = parser.parse_args(argv)
    # An unwritable --out (or results/ folder) would otherwise surface only after the whole run.
    out = getattr(args, "out", None)
    try:
        io.check_writable(Path(out) if out else REPO_ROOT / "results" / f"{args.benchmark}.json")
    except ValueError as error:
        args._parser.error(f"--out: {error}")
    from effllm.models import dtype_line

    try:
        print(dtype_line(), flush=True)
    except ValueError as error:  # a bad EFFLLM_DTYPE: before any model loads
        args._parser.error(str(error))
    return modules[args.benchmark].run(args)


if __name__ == "__main__":
    sys.exit(main())
