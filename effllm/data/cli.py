"""``python -m effllm.data build | list``: build the built-in sets into the cache (run once by ``make setup``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from effllm.data.builtin import build, builtin_records
from effllm.data.catalogue import BUILTIN, HUB, DataNotAvailableError

# --------------------------------------------------------------------------------------------------
# Command line


@dataclass
class _BuildReport:
    name: str
    records: int = 0
    megabytes: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)


def _build_all(names: Sequence[str], force: bool) -> int:
    status = 0
    for name in names:
        try:
            path = build(name, force=force)
        except DataNotAvailableError as error:
            print(f"{name:14s} skipped: {error}")
            continue
        except Exception as error:  # keep building the others, but fail the command
            print(f"{name:14s} FAILED: {type(error).__name__}: {error}")
            status = 1
            continue
        records = builtin_records(name)
        report = _BuildReport(name, len(records), path.stat().st_size / 1e6)
        for record in records:
            report.splits[record["split"]] = report.splits.get(record["split"], 0) + 1
        splits = ", ".join(f"{s} {n}" for s, n in sorted(report.splits.items()))
        print(f"{name:14s} {report.records:6d} records {report.megabytes:7.2f} MB  ({splits})  {path}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m effllm.data", description="Data sets: built-in offline corpora and tasks, hub names of the papers, calibration windows.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build the built-in data sets into the cache")
    build_parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(BUILTIN)}")
    build_parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    commands.add_parser("list", help="list built-in and hub data sets")
    args = parser.parse_args(argv)
    if args.command == "list":
        for info in BUILTIN.values():
            print(f"{info.name:14s} {info.kind:6s} {info.licence:10s} {info.description}")
        for hub_name, spec in HUB.items():
            print(f"{hub_name:14s} hub    {spec.path}" + (f" ({spec.config})" if spec.config else ""))
        return 0
    unknown = [name for name in args.names if name not in BUILTIN]
    if unknown:
        parser.error(f"unknown built-in data set(s) {', '.join(unknown)}; choose from {', '.join(BUILTIN)}")
    return _build_all(args.names or list(BUILTIN), args.force)
