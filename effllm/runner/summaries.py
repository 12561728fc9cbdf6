"""Sweep-level steps: what a sweep computes from all of its runs together, once they are done.

A run of a sweep sees only its own grid point. Some results need every run: the Wanda sweep
(sweeps/wanda_calibration_sets.yaml) prunes one sub-model per run, and comparing the sub-models' masks across
calibration sets needs the masks of all runs. A sweep file declares such a step under ``summary``:

    parameters: {save_submodel_masks: true, compare_submodels: false}   # each run saves its masks
    summary:
      kind: mask_overlap           # the kinds: SUMMARY_KINDS
      compare: calibration_sets    # the swept parameter that names each run's mask set
      weight_view_pairs: [[math_orca, math_qa], [math_orca, opus_books]]   # optional

``run_all.py --sweep FILE`` runs it after the runs, on the runs that succeeded, and writes into
``<figures>/sweeps/<sweep>/summary/``; ``python -m effllm.runner.summaries <that sweep folder>`` runs it again
(after a cluster run, or with other options), reading the sweep's ``summary.json``.

``mask_overlap``: each ok run's ``masks/<set>.safetensors`` (written by notebook 04 through
``effllm.pruning.save_masks``: checksummed, bound to the model's fingerprint) is loaded and checked; runs that
differ in a swept parameter other than ``compare`` (pattern, sparsity) form separate groups, since masks of
different pruning settings do not compare. Per group: the whole-model Jaccard matrix of the pruned positions
(sets ordered by domain), the full pairwise table (per linear, per layer, whole model), the mean Jaccard of
same-domain and of cross-domain pairs against the random-mask baseline, and the weight views of the
``weight_view_pairs`` (the q projection of the runs' ``weight_view_layer``, as in notebook 04). From the same runs,
seed 002's table over every calibration set: ``domain_table_<group>.csv`` (the dense row once, then each run's
row of notebook 04's ``04_domain_table.csv``) and ``domain_means_<group>.csv`` (per domain the mean of its task
metrics, ``effllm.domains.domain_means``). Every mask set
must come from one model (one fingerprint); for the weight views the model is loaded (with the sweep
profile's environment, so stand-ins for ``paper-standins``) in the runs' dtype, and every mask set is checked
against it.

Memory: all mask sets of a group are held at once, one byte per weight each (effllm.pruning's format). That is
nothing on stand-ins; on a 7B model it is about 7 GB per calibration set, so run the step on a machine sized
for it (``python -m effllm.runner.summaries`` on a node of the cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from effllm.paths import write_atomic

SUMMARY_KEYS = ("kind", "compare", "weight_view_pairs", "weight_view_triples")
SUMMARY_FOLDER = "summary"  # inside the sweep's figure folder
MASKS_FOLDER = "masks"  # inside a run's figure folder (notebook 04, save_submodel_masks)
DOMAIN_TABLE = "04_domain_table.csv"  # inside a run's figure folder: dense + the run's calibration set(s)


class SummaryError(ValueError):
    """A sweep-level step that cannot run: the message says what is missing and what to do."""


@dataclass(frozen=True)
class SummarySpec:
    """A sweep file's ``summary`` entry (see the module docstring)."""

    kind: str = "mask_overlap"
    compare: str = "calibration_sets"
    weight_view_pairs: tuple[tuple[str, str], ...] = ()
    weight_view_triples: tuple[tuple[str, str, str], ...] = ()  # the seed's three-way comparisons


@dataclass
class SummaryResult:
    folder: Path
    files: list[str] = field(default_factory=list)  # relative to `folder`
    lines: list[str] = field(default_factory=list)  # what was printed


def parse_summary(raw: Any, swept: Sequence[str], where: str) -> SummarySpec:
    """Check a sweep file's ``summary`` entry; ``swept`` are the grid's parameter names. Raises ValueError with
    a message that starts at the entry (the sweep loader prefixes the file)."""
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(SUMMARY_KEYS)}; got {raw!r}")
    unknown = sorted(set(raw) - set(SUMMARY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SUMMARY_KEYS)}")
    kind = raw.get("kind")
    if kind not in SUMMARY_KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(SUMMARY_KINDS)}; got {kind!r}")
    compare = raw.get("compare", SummarySpec.compare)
    if compare not in swept:
        raise ValueError(f"{where}.compare must name a swept parameter (one of {', '.join(swept)}), whose "
                         f"values name each run's mask set; got {compare!r}")
    pairs = raw.get("weight_view_pairs") or []
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n for n in p) and p[0] != p[1]
            for p in pairs):
        raise ValueError(f"{where}.weight_view_pairs must be a list of pairs of two different mask set names, "
                         f"e.g. [[math_orca, math_qa]]; got {pairs!r}")
    triples = raw.get("weight_view_triples") or []
    if not isinstance(triples, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(n, str) and n for n in t) and len(set(t)) == 3
            for t in triples):
        raise ValueError(f"{where}.weight_view_triples must be a list of three different mask set names each, "
                         f"e.g. [[math_qa, math_orca, opus_books]]; got {triples!r}")
    return SummarySpec(kind=kind, compare=compare, weight_view_pairs=tuple(tuple(p) for p in pairs),
                       weight_view_triples=tuple(tuple(t) for t in triples))


def spec_to_json(spec: SummarySpec) -> dict[str, Any]:
    return {**asdict(spec), "weight_view_pairs": [list(p) for p in spec.weight_view_pairs],
            "weight_view_triples": [list(t) for t in spec.weight_view_triples]}


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Set ``variables`` in this process for the block (the profile's environment, as its kernels get it)."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _file_stem(text: str) -> str:
    """A plain file stem for effllm.plots (letters, digits, '_', '-', '.')."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "all"


def _one(values: list[Any], what: str) -> Any:
    distinct = {json.dumps(v, sort_keys=True) for v in values}
    if len(distinct) != 1:
        raise SummaryError(f"the runs differ in {what} ({', '.join(sorted(distinct))}); their masks cannot be "
                           "compared in one summary")
    return values[0]


# ---------------------------------------------------------------------------------------------------------
# mask_overlap


def _group_of(run: dict[str, Any], compare: str) -> str:
    """A run's group: its swept values besides ``compare`` (the pruning setting), as a file name."""
    rest = {k: v for k, v in run["parameters"].items() if k != compare}
    return _file_stem("_".join(f"{k}-{v}" for k, v in rest.items())) if rest else "all"


def _collect(folder: Path, runs: list[dict[str, Any]], compare: str) -> dict[str, dict[str, Path]]:
    """``{group: {mask set: file}}``: every ok run's saved masks, grouped by the swept values besides
    ``compare``."""
    groups: dict[str, dict[str, Path]] = {}
    for run in runs:
        masks_dir = folder / run["run_id"] / MASKS_FOLDER
        files = sorted(masks_dir.glob("*.safetensors"))
        if not files:
            raise SummaryError(
                f"run {run['run_id']} saved no masks (no {MASKS_FOLDER}/*.safetensors in {folder / run['run_id']}); "
                "the sweep's runs must set save_submodel_masks: true (notebook 04) under 'parameters'")
        group = _group_of(run, compare)
        for file in files:
            name = file.name[: -len(".safetensors")].replace("--", "/")
            if name in groups.setdefault(group, {}):
                raise SummaryError(f"two runs of group {group} saved masks for {name!r} ({groups[group][name]} and "
                                   f"{file}); give each run its own {compare}")
            groups[group][name] = file
    return groups


def _fingerprint(file: Path) -> str | None:
    """The model fingerprint recorded with a mask file (read after load_masks checked the sidecar's checksum)."""
    meta = json.loads(file.with_name(file.name + ".json").read_text())["meta"]
    return (meta.get("fingerprint") or {}).get("weights_sha256")


@dataclass
class _MaskRuns:
    """The ok runs of a mask_overlap sweep, their mask files by group, and what they share."""

    runs: list[dict[str, Any]]
    skipped: int
    groups: dict[str, dict[str, Path]]
    model_name: str
    dtype: str | None
    layer: int | None
    model: Any  # loaded only for the weight views: None without any
    provenance: str


def _mask_runs(folder: Path, payload: dict[str, Any], spec: SummarySpec, device: str) -> _MaskRuns:
    from effllm import plots
    from effllm.models import load_model
    from effllm.runner.profiles import profile_environment

    runs = [run for run in payload["runs"] if run["status"] == "ok"]
    groups = _collect(folder, runs, spec.compare)
    all_parameters = [run["all_parameters"] for run in runs]
    model_name = _one([p.get("model_name") for p in all_parameters], "model_name")
    dtype = _one([p.get("dtype") for p in all_parameters], "dtype")
    layer = _one([p.get("weight_view_layer") for p in all_parameters], "weight_view_layer")
    wanted_views = [names for names in spec.weight_view_pairs + spec.weight_view_triples
                    if any(set(names) <= set(files) for files in groups.values())]
    model = None
    if wanted_views:  # the dense weights of the viewed linear; every mask set is checked against this model
        with _environment(profile_environment(payload["profile"])):
            model, _ = load_model(model_name, dtype=dtype, device=device)
    provenance = plots.provenance(model=model_name, extra=f"sweep {payload['sweep']}, profile {payload['profile']}")
    return _MaskRuns(runs, len(payload["runs"]) - len(runs), groups, model_name, dtype, layer, model, provenance)


def _save(result: SummaryResult, fig: Any, name: str, table: Any) -> None:
    import matplotlib.pyplot as plt

    from effllm import plots

    written = plots.save_figure(fig, name, table=table, out_dir=result.folder)
    plt.close(fig)
    result.files += [path.relative_to(result.folder).as_posix() for path in written.values()]


def _weight_views(result: SummaryResult, spec: SummarySpec, runs: _MaskRuns, group: str,
                  masks: dict[str, dict[str, Any]]) -> None:
    from effllm.experiments.masks import MaskComparisonError, three_way_view, weight_view

    for pair in spec.weight_view_pairs:
        if not set(pair) <= set(masks):
            result.lines.append(f"  {group}: weight view {pair[0]} / {pair[1]} skipped: no ok run saved "
                                f"{', '.join(sorted(set(pair) - set(masks)))}")
            continue
        try:
            fig, table = weight_view(runs.model, runs.layer, masks, pair, f"{group} · {runs.provenance}")
        except MaskComparisonError as error:
            raise SummaryError(f"weight view: {error}") from None
        _save(result, fig, _file_stem(f"weight_views_{group}_{pair[0]}_vs_{pair[1]}"), table)
        changed = int(table.weights[1] + table.weights[2])
        result.lines.append(f"  {group}: weight view {pair[0]} / {pair[1]}: masks differ at {changed} of "
                            f"{int(table.weights.sum())} weights")
    for names in spec.weight_view_triples:
        if not set(names) <= set(masks):
            result.lines.append(f"  {group}: three-way view {' / '.join(names)} skipped: no ok run saved "
                                f"{', '.join(sorted(set(names) - set(masks)))}")
            continue
        try:
            fig, table = three_way_view(runs.model, runs.layer, masks, names, f"{group} · {runs.provenance}")
        except MaskComparisonError as error:
            raise SummaryError(f"three-way view: {error}") from None
        _save(result, fig, _file_stem(f"three_way_{group}_{'_'.join(names)}"), table)
        split = float(table[(table.sets_pruning > 0) & (table.sets_pruning < 3)].share.sum())
        result.lines.append(f"  {group}: three-way view {' / '.join(names)}: pruned by one or two of the three "
                            f"only at {split:.1%} of the weights")


def _summarize_group(result: SummaryResult, spec: SummarySpec, runs: _MaskRuns, group: str,
                     masks: dict[str, dict[str, Any]]) -> Any:
    """One group's Jaccard figure, pairwise table and weight views; its MaskOverlap."""
    from effllm import pruning
    from effllm.experiments.masks import compare_mask_sets, jaccard_figure

    roles = pruning.linear_roles(runs.model) if runs.model is not None else None
    overlap = compare_mask_sets(masks, group, roles)
    row = overlap.row
    _save(result, jaccard_figure(overlap.matrix, overlap.domains, row["random_baseline"],
                                 f"Whole-model Jaccard, {group}\n{runs.provenance}"),
          f"jaccard_{group}", overlap.matrix.reset_index(names="calibration"))
    write_atomic(result.folder / f"jaccard_pairwise_{group}.csv", overlap.pairwise.to_csv(index=False).encode())
    result.files.append(f"jaccard_pairwise_{group}.csv")
    result.lines.append(
        f"  {group}: {len(overlap.masks)} mask sets; mean whole-model Jaccard same-domain "
        f"{row['same_domain_jaccard']:.3f} ({row['same_domain_pairs']} pairs), cross-domain "
        f"{row['cross_domain_jaccard']:.3f} ({row['cross_domain_pairs']} pairs); random masks "
        f"{row['random_baseline']:.3f}")
    _weight_views(result, spec, runs, group, overlap.masks)
    return overlap


def summarize_mask_overlap(folder: Path, payload: dict[str, Any], spec: SummarySpec,
                           device: str = "cpu") -> SummaryResult:
    """The ``mask_overlap`` step on a sweep's figure folder (see the module docstring)."""
    import pandas as pd

    from effllm import pruning
    from effllm.experiments.masks import same_vs_cross_figure

    result = SummaryResult(folder / SUMMARY_FOLDER)
    runs = _mask_runs(folder, payload, spec, device)
    result.lines.append(
        f"mask_overlap of sweep {payload['sweep']}: {len(runs.runs)} ok run(s)"
        + (f" ({runs.skipped} not ok, left out)" if runs.skipped else "") + f", {len(runs.groups)} group(s) by "
        + (", ".join(k for k in runs.runs[0]["parameters"] if k != spec.compare) or "nothing")
        + f"; model {runs.model_name}")
    fingerprints = set()
    pair_rows, group_rows = [], []
    for group, files in runs.groups.items():
        masks = {name: pruning.load_masks(file, runs.model) for name, file in files.items()}  # checksums
        fingerprints |= {_fingerprint(file) for file in files.values()}
        if len(fingerprints) > 1:
            raise SummaryError(f"the saved masks were pruned from {len(fingerprints)} different models (their "
                               "fingerprints differ); a summary compares masks of one model")
        if len(masks) < 2:
            result.lines.append(f"  {group}: only {', '.join(masks)}: no pair to compare (a pair needs two ok runs)")
            continue
        overlap = _summarize_group(result, spec, runs, group, masks)
        pair_rows.append(overlap.pairs)
        group_rows.append(overlap.row)
    if pair_rows:
        pairs = pd.concat(pair_rows, ignore_index=True)
        _save(result, same_vs_cross_figure(pairs, f"Same-domain vs cross-domain mask overlap\n{runs.provenance}"),
              "same_vs_cross_domain", pairs)
        summary = {"sweep": payload["sweep"], "profile": payload["profile"], "model_name": runs.model_name,
                   "dtype": runs.dtype, "runs": len(runs.runs), "runs_left_out": runs.skipped,
                   "spec": spec_to_json(spec), "fingerprint": next(iter(fingerprints)), "groups": group_rows}
        write_atomic(result.folder / "mask_overlap.json", (json.dumps(summary, indent=2) + "\n").encode())
        result.files.append("mask_overlap.json")
    return result


def _domain_tables(result: SummaryResult, folder: Path, runs: list[dict[str, Any]], compare: str) -> None:
    """Seed 002's table over the whole sweep: per group the dense row (once) and every run's calibration-set row of
    notebook 04's ``DOMAIN_TABLE``, then the per-domain means of the task metrics (``effllm.domains.domain_means``);
    runs without the table (notebook 04 failed before it) are left out and named."""
    import pandas as pd

    from effllm import domains

    by_group: dict[str, list[Any]] = {}
    missing = []
    for run in runs:
        file = folder / run["run_id"] / DOMAIN_TABLE
        if file.is_file():
            by_group.setdefault(_group_of(run, compare), []).append(pd.read_csv(file))
        else:
            missing.append(run["run_id"])
    if missing:
        result.lines.append(f"  domain table: no {DOMAIN_TABLE} in run(s) {', '.join(missing)}: left out")
    for group, tables in by_group.items():
        rows = pd.concat(tables, ignore_index=True)
        dense = rows[rows.calibration == domains.DENSE].head(1)  # every run scores the same dense model
        table = pd.concat([dense, rows[rows.calibration != domains.DENSE].drop_duplicates("calibration")],
                          ignore_index=True)
        frames = {"domain_table": table}
        if any(column in domains.TASK_METRIC_DOMAINS for column in table.columns):
            frames["domain_means"] = domains.domain_means(table)
        for name, frame in frames.items():
            write_atomic(result.folder / f"{name}_{group}.csv", frame.to_csv(index=False).encode())
            result.files.append(f"{name}_{group}.csv")
        result.lines.append(f"  {group}: domain table of {len(table) - len(dense)} calibration set(s)"
                            + (" and dense" if len(dense) else ""))


def summarize_sweep_masks(folder: Path, payload: dict[str, Any], spec: SummarySpec, device: str = "cpu") -> SummaryResult:
    """``mask_overlap``: the masks' overlap (:func:`summarize_mask_overlap`) and, from the same runs, seed 002's
    domain table over every calibration set (:func:`_domain_tables`)."""
    result = summarize_mask_overlap(folder, payload, spec, device)
    _domain_tables(result, folder, [run for run in payload["runs"] if run["status"] == "ok"], spec.compare)
    return result


SUMMARY_KINDS = {"mask_overlap": summarize_sweep_masks}


def run_summary(folder: str | Path, spec: SummarySpec | None = None, device: str = "cpu",
                out: TextIO | None = None) -> SummaryResult:
    """Run a sweep's summary step on its figure folder (which holds the sweep's ``summary.json``); ``spec``
    defaults to the one recorded there. Prints its lines to ``out`` (stdout)."""
    out = out or sys.stdout
    folder = Path(folder).resolve()
    try:
        payload = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as error:
        raise SummaryError(f"{folder} holds no readable summary.json ({error}); give the sweep's figure folder, "
                           "e.g. build/paper-standins/figures/sweeps/wanda_calibration_sets") from None
    if spec is None:
        recorded = payload.get("summary_step")
        if not recorded:
            raise SummaryError(f"the sweep in {folder} declares no summary step ('summary' in its sweep file); "
                               "give one, e.g. --kind mask_overlap")
        spec = SummarySpec(kind=recorded["kind"], compare=recorded["compare"],
                           weight_view_pairs=tuple(tuple(p) for p in recorded.get("weight_view_pairs", [])),
                           weight_view_triples=tuple(tuple(t) for t in recorded.get("weight_view_triples", [])))
    if not any(run["status"] == "ok" for run in payload["runs"]):
        raise SummaryError(f"no run of sweep {payload['sweep']} succeeded: nothing to summarize")
    result = SUMMARY_KINDS[spec.kind](folder, payload, spec, device=device)
    for line in result.lines:
        print(line, file=out, flush=True)
    print(f"summary ({len(result.files)} files) in {result.folder}", file=out, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m effllm.runner.summaries FOLDER``: 0 done, 1 the step failed, 2 bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m effllm.runner.summaries",
        description="Run a sweep's summary step (its sweep file's 'summary') again on the sweep's figure folder.")
    parser.add_argument("folder", type=Path, help="the sweep's figure folder (it holds summary.json), e.g. "
                        "build/paper-standins/figures/sweeps/wanda_calibration_sets")
    parser.add_argument("--kind", choices=list(SUMMARY_KINDS), help="default: the sweep file's summary kind")
    parser.add_argument("--compare", help="the swept parameter naming each run's mask set (default: the sweep "
                        "file's, else calibration_sets)")
    parser.add_argument("--weight-view-pair", nargs=2, action="append", metavar=("A", "B"),
                        help="mask sets to show side by side (repeatable; default: the sweep file's)")
    parser.add_argument("--device", default="cpu", help="where the model for the weight views loads (default: cpu)")
    args = parser.parse_args(argv)
    spec = None
    if args.kind or args.compare or args.weight_view_pair:
        try:
            recorded = json.loads((args.folder / "summary.json").read_text()).get("summary_step") or {}
        except (OSError, ValueError):
            recorded = {}
        pairs = args.weight_view_pair or recorded.get("weight_view_pairs", [])
        spec = SummarySpec(kind=args.kind or recorded.get("kind", SummarySpec.kind),
                           compare=args.compare or recorded.get("compare", SummarySpec.compare),
                           weight_view_pairs=tuple(tuple(p) for p in pairs))
    from effllm.io import ArtifactError
    from effllm.pruning import MaskMismatchError

    try:
        run_summary(args.folder, spec, device=args.device)
    except (SummaryError, MaskMismatchError, ArtifactError) as error:
        print(f"summary failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
