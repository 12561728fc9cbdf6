#!/usr/bin/env python
"""Run the notebooks headlessly with papermill and regenerate their figures.

    python run_all.py                          # every notebook, default profile -> figures/
    python run_all.py --profile smoke          # tiny sizes, seconds per notebook -> build/smoke/figures/
    python run_all.py --only 00 -p max_new_tokens=32
    python run_all.py --profile paper --jobs 2 # the papers' models, on a GPU -> figures/paper/
    python run_all.py --sweep sweeps/wanda_calibration_sets.yaml --executor ray|slurm|local

Each notebook ``notebooks/NN_title.py`` (the jupytext twin of ``NN_title.ipynb``) becomes one `Job`.
The job runs in its own kernel with ``figures_dir`` pointing at a private staging folder; only when the
notebook finishes without error are its files moved into the profile's publish folder, so a failed
notebook never leaves half-written figures behind. Executed copies go to ``build/<profile>/executed/``
and a summary to ``build/<profile>/summary.json``; the exit code is 1 when any notebook failed.

Executors: `run_job` is a pure, picklable function of a `Job`; an executor only has to call it somewhere
and hand back a `concurrent.futures.Future`. `LocalExecutor` uses threads (each papermill run already
starts its kernel in its own process). Sweeps (``--sweep FILE``, see effllm/scale.py) run one notebook
over a parameter grid on the local, Ray (`effllm.scale.RayExecutor`) or SLURM (`SubmititExecutor`)
executor; a remote run executes `run_job_isolated` in a private folder and ships its files back, and
`land` puts them into this repository's layout, so no shared file system is needed for outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import yaml

from effllm.paths import write_atomic

if TYPE_CHECKING:
    from nbformat import NotebookNode

REPO_ROOT = Path(__file__).resolve().parent
NOTEBOOK_PATTERN = "[0-9][0-9]_*.py"
COMMON_PARAMETERS = ("profile", "model_name", "seed", "figures_dir")
# Set by run_all.py itself for every job; `-p` may not override them.
RESERVED_PARAMETERS = ("profile", "figures_dir")
EXECUTOR_NAMES = ("local", "ray", "slurm")  # --executor, for sweeps (effllm/scale.py)

# profile -> {"common": parameters every notebook gets, "<notebook stem>": that notebook's overrides}.
# Only the parameters a notebook declares in its `parameters` cell are passed to it.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # Tiny random model, a handful of tokens: seconds per notebook; what tests run.
    "smoke": {
        "common": {"model_name": "tiny-llama", "seed": 0},
        "00_quickstart": {"max_new_tokens": 8, "lens_sequences": 2, "lens_seq_len": 32},
        "01_early_exit": {"n_prompts": 2, "max_new_tokens": 6, "rounds": 1, "use_fitted_exits": False, "lens_seq_len": 32,
                          "meta_windows": 1, "state_thresholds": [0.5],
                          "lens_corpora": ["arithmetic"], "thresholds": [0.5, 0.01], "calibration_prompts": 3,
                          "calibration_tokens": 4, "ltt_candidates": [1.5], "ltt_distance": "token",
                          "ltt_delta": 0.9, "ltt_epsilon": 0.5, "adaptive_prompts": 3, "adaptive_tokens": 6},
        "02_vocab_pruning": {"model_names": ["tiny-llama", "tiny-gemma3"], "prompt_data": ["builtin", "builtin"],
                             "use_fitted_exits": False, "k": 16, "ks": [4, 16, 64], "generation_ks": [4, 16],
                             "analysis_corpora": ["arithmetic"],
                             "analysis_seq_len": 32, "n_prompts": 2, "max_new_tokens": 5, "cost_min_run_time": 0.01,
                             "rounds": 1},
        "04_domain_submodels": {"calibration_samples": 4, "calibration_seq_len": 32, "perplexity_windows": 2,
                                "perplexity_seq_len": 32, "humaneval_problems": 1, "humaneval_max_new_tokens": 8,
                                "arithmetic_problems": 2, "arithmetic_max_new_tokens": 8, "zero_shot_limit": 4,
                                "zero_shot_tasks": ["prose-mc"], "speed_samples": 2, "speed_seq_len": 32},
        "05_sparse_speedup": {"shape_sets": ["model"], "token_counts": {"model": [1, 4]}, "min_run_time": 0.001,
                              "rounds": 1, "prompt_tokens": 16, "decode_tokens": 4},
        "06_dynamic_slicing": {"calibration_samples": 4, "calibration_seq_len": 32, "eval_windows": 2,
                               "eval_seq_len": 32, "means": [0.5], "vector_mean": 0.25,
                               "zero_shot_tasks": ["arithmetic-mc"], "zero_shot_limit": 2},
        "03_layer_selection": {"budgets": [0.25, 0.5, 0.75, 1.0], "n_prompts": 2, "max_new_tokens": 6,
                               "similarity_windows": 2, "similarity_seq_len": 32, "similarity_prompt_len": 8,
                               "similarity_points": 4, "controller_examples": 4, "controller_steps": 3},
        "07_efficiency_frontier": {"calibration_samples": 4, "calibration_seq_len": 32, "eval_windows": 2,
                                   "eval_seq_len": 32, "n_prompts": 2, "max_new_tokens": 6, "prefill_tokens": 16,
                                   "prefill_min_run_time": 0.01, "shortgpt_fraction": 0.25, "skip_budget": 0.75,
                                   "use_fitted_exits": False, "k": 16, "calibration_prompts": 3,
                                   "calibration_tokens": 4, "ltt_candidates": [0.5], "humaneval_problems": 1,
                                   "slice_levels": [0.2],
                                   "humaneval_max_new_tokens": 8, "zero_shot_task": "arithmetic-mc",
                                   "zero_shot_limit": 2, "batch_size": 4, "speed_prompts": 1, "rounds": 1},
    },
    # The embedded SmolLM2-135M on a 2-core CPU: minutes per notebook; what `make run` runs.
    "default": {
        "common": {"model_name": "smollm2-135m", "seed": 0},
        "00_quickstart": {"max_new_tokens": 64, "lens_sequences": 8, "lens_seq_len": 256},
        "01_early_exit": {"n_prompts": 4, "max_new_tokens": 24, "thresholds": [0.99, 0.95, 0.9, 0.7],
                          "calibration_prompts": 12, "calibration_tokens": 12, "adaptive_prompts": 12,
                          "adaptive_tokens": 24},
        "02_vocab_pruning": {"model_names": ["smollm2-135m", "gemma3-270m"], "prompt_data": ["builtin", "builtin"],
                             "k": 256, "threshold": 0.9, "generation_ks": [16, 256, 4096], "n_prompts": 4,
                             "max_new_tokens": 24,
                             "analysis_sequences": 1, "analysis_seq_len": 128},
        "04_domain_submodels": {"calibration_samples": 32, "calibration_seq_len": 128, "perplexity_windows": 4,
                                "perplexity_seq_len": 256, "humaneval_problems": 4, "humaneval_max_new_tokens": 96,
                                "arithmetic_problems": 16, "arithmetic_max_new_tokens": 40, "zero_shot_limit": 24,
                                "speed_samples": 8, "speed_seq_len": 128},
        "05_sparse_speedup": {"shape_sets": ["model", "codellama-13b"],
                              "token_counts": {"model": [1, 16, 2048], "codellama-13b": [1, 16]},
                              "threads": 1, "min_run_time": 0.2, "rounds": 2, "prompt_tokens": 128,
                              "decode_tokens": 16},
        "06_dynamic_slicing": {"calibration_samples": 8, "calibration_seq_len": 256, "eval_windows": 8,
                               "eval_seq_len": 256, "means": [0.1, 0.2, 0.3, 0.4],
                               "zero_shot_tasks": ["prose-mc"], "zero_shot_limit": 40},
        "03_layer_selection": {"budgets": [4 / 24, 8 / 24, 12 / 24, 1.0], "n_prompts": 8, "max_new_tokens": 32,
                               "similarity_windows": 4, "similarity_seq_len": 128, "similarity_prompt_len": 32,
                               "similarity_points": 10, "controller_examples": 48, "controller_steps": 30},
        "07_efficiency_frontier": {"n_prompts": 4, "max_new_tokens": 32, "slice_levels": [0.1, 0.2, 0.3],
                                   # HumanEval off: minutes per row here, and the dense SmolLM2-135M solves none
                                   # of the first problems (notebook 04), so pass@1 would be 0 on every row.
                                   "humaneval_problems": 0, "zero_shot_task": "prose-mc", "zero_shot_limit": 40},
    },
    # The papers' own models and hub data sets, on GPUs (needs the hub: HF_TOKEN for gated models).
    "paper": {
        "common": {"model_name": "meta-llama/Llama-3.2-1B", "seed": 0},
        "00_quickstart": {"max_new_tokens": 128, "lens_sequences": 32, "lens_seq_len": 1024},
        # Seed 001 (FREE): T5-large, SAMSum and SQuAD, shallow exit 6 of 24, thresholds around 0.9.
        "01_early_exit": {"model_name": "google-t5/t5-large", "prompt_data": ["samsum", "squad"], "n_prompts": 50,
                          "max_new_tokens": 64, "use_fitted_exits": False, "shallow_exit_layer": 6,
                          "static_exit_layers": [6, 12, 18], "thresholds": [0.95, 0.9, 0.8, 0.6, 0.4],
                          "calibration_prompts": 200, "calibration_tokens": 64, "adaptive_prompts": 300,
                          "adaptive_tokens": 64},
        # Seed 000: the authors' fine-tuned T5-large checkpoints, exit_min_layer 19, k = 256, threshold 0.9.
        "02_vocab_pruning": {"model_names": ["jvelja/t5-squad", "jvelja/t5-samsum"], "prompt_data": ["squad", "samsum"],
                             "use_fitted_exits": False, "exit_min_layer": 19, "k": 256, "threshold": 0.9,
                             "ks": [16, 64, 256, 1024, 4096, 16384], "generation_ks": [16, 64, 256, 1024, 4096],
                             "analysis_sequences": 16,
                             "analysis_seq_len": 64, "n_prompts": 100, "max_new_tokens": 64},
        # Seed 002: Gemma-1.1-7b-it (or -p model_name=codellama/CodeLlama-13b-Instruct-hf), the seed's hub
        # calibration sets (effllm.data.HUB), HumanEval (all 164), GSM8K and Wanda's lm-eval zero-shot suite.
        "04_domain_submodels": {"model_name": "google/gemma-1.1-7b-it", "device": "cuda", "dtype": "bfloat16",
                                "calibration_sets": ["python_alpaca", "openbookqa", "commonsenseqa", "math_instruct",
                                                     "orca_math", "c4"],
                                "calibration_samples": 128, "calibration_seq_len": 2048,
                                "perplexity_domains": {"prose": "wikitext2", "web": "c4"}, "perplexity_windows": None,
                                "perplexity_seq_len": 2048, "humaneval_problems": 164,
                                "humaneval_max_new_tokens": 512, "math_task": "gsm8k", "arithmetic_problems": 1319,
                                "arithmetic_max_new_tokens": 256,
                                "zero_shot_tasks": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                                                    "arc_challenge", "openbookqa"], "zero_shot_limit": None,
                                "batch_size": 8, "weight_view_layer": 12,
                                "weight_view_pair": ["math_instruct", "orca_math"], "speed_samples": 64,
                                "speed_seq_len": 256, "speed_patterns": ["unstructured", "2:4"]},
        "05_sparse_speedup": {"device": "cuda", "shape_sets": ["model", "codellama-13b"],
                              "token_counts": {"model": [1, 16, 2048], "codellama-13b": [1, 16, 2048]},
                              "threads": None, "min_run_time": 1.0, "rounds": 3, "prompt_tokens": 2048,
                              "decode_tokens": 128},
        # Seed 004 (Dumitru et al.): Llama-3-8B (or -p model_name=mistralai/Mistral-7B-v0.1), wikitext2,
        # M = 0.1 .. 0.4. Its lm-eval tasks (hellaswag, winogrande, arc_easy, piqa, mmlu, arc_challenge) are
        # not among effllm.zeroshot's built-in tasks, so the built-in ones are used.
        "06_dynamic_slicing": {"model_name": "meta-llama/Meta-Llama-3-8B", "device": "cuda", "dtype": "float16",
                               "calibration_data": "wikitext2", "calibration_samples": 128,
                               "calibration_seq_len": 2048, "eval_data": "wikitext2", "eval_windows": None,
                               "eval_seq_len": 2048, "means": [0.1, 0.2, 0.3, 0.4], "amplitude": 0.1,
                               "zero_shot_tasks": ["arithmetic-mc", "prose-mc"], "zero_shot_limit": None,
                               "batch_size": 4},

        # Seed 003 (Glavas et al.): OPT-IML-1.3b (24 layers) on Alpaca, the 4 / 8 / 12 / 24-layer budgets.
        "03_layer_selection": {"model_name": "facebook/opt-iml-1.3b", "device": "cuda", "task": "alpaca",
                               "budgets": [4 / 24, 8 / 24, 12 / 24, 1.0], "n_prompts": 200, "max_new_tokens": 128,
                               "similarity_corpus": "alpaca", "similarity_windows": 32, "similarity_seq_len": 512,
                               "similarity_prompt_len": 128, "similarity_points": 24, "controller_examples": 2000,
                               "controller_steps": 2000},
        "07_efficiency_frontier": {"device": "cuda", "dtype": "bfloat16", "calibration_data": "wikitext2",
                                   "calibration_samples": 128, "calibration_seq_len": 2048, "eval_data": "wikitext2",
                                   "eval_windows": None, "eval_seq_len": 2048, "n_prompts": 32,
                                   "max_new_tokens": 128, "prefill_tokens": 1024, "calibration_prompts": 64,
                                   "calibration_tokens": 64, "humaneval_problems": 164,
                                   "humaneval_max_new_tokens": 512, "zero_shot_task": "arithmetic-mc",
                                   "zero_shot_limit": None},
    },
}


def publish_dir_for(profile: str, build_dir: Path) -> Path:
    """Where a profile's figures are published: smoke never touches figures/."""
    return {
        "smoke": build_dir / "smoke" / "figures",
        "default": REPO_ROOT / "figures",
        "paper": REPO_ROOT / "figures" / "paper",
    }[profile]


@dataclass(frozen=True)
class Job:
    """One notebook run: everything `run_job` needs, picklable for a remote executor."""

    notebook: Path  # the py:percent twin, notebooks/NN_title.py
    parameters: dict[str, Any]  # exactly what papermill injects
    output_path: Path  # executed copy, build/<profile>/executed/NN_title.ipynb
    staging_dir: Path  # the notebook's figures_dir while it runs
    publish_dir: Path  # where its figures go once it succeeded
    timeout: float | None = None  # per-cell execution timeout in seconds (papermill execution_timeout)
    # Extra environment for the kernel. The hook for GPU runs: an executor that places jobs on devices
    # sets CUDA_VISIBLE_DEVICES here.
    env: dict[str, str] = field(default_factory=dict)
    time_limit: float | None = None  # seconds for the whole notebook; its kernel is killed after that
    run_id: str | None = None  # a sweep's run (its folder name); shown instead of the notebook's name

    @property
    def name(self) -> str:
        return self.run_id or self.notebook.stem


@dataclass
class JobResult:
    notebook: str
    status: str  # "ok" | "failed"
    seconds: float
    figures: list[str]  # published files, relative to the publish folder
    error: str | None = None
    executed: str | None = None  # path of the executed copy


class Executor(Protocol):
    def submit(self, job: Job) -> Future[JobResult]: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs jobs on this machine, `jobs` notebooks at a time."""

    def __init__(self, jobs: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook")

    def submit(self, job: Job) -> Future[JobResult]:
        return self._pool.submit(run_job, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------
# Notebooks and parameters


def discover_notebooks(notebooks_dir: Path) -> list[Path]:
    """The py:percent twins ``NN_title.py`` in reading order."""
    return sorted(notebooks_dir.glob(NOTEBOOK_PATTERN))


def read_notebook(path: Path) -> NotebookNode:
    """A notebook from its py:percent (or .ipynb) file, with a kernelspec papermill can use."""
    import jupytext

    nb = jupytext.read(path)
    # papermill needs a kernel to parse the parameters cell; a twin without a jupytext header has none.
    nb.metadata.setdefault(
        "kernelspec", {"name": "python3", "language": "python", "display_name": "Python 3"}
    )
    return nb


def has_parameters_cell(nb: NotebookNode) -> bool:
    return any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def declared_parameters(path: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (empty when it has none)."""
    import papermill

    return list(papermill.inspect_notebook(read_notebook(path)))


def select_notebooks(notebooks: Sequence[Path], names: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Notebooks matching any of `names` (stem, NN prefix or title), and the names that matched none."""
    selected: set[Path] = set()
    unmatched = []
    for raw in names:
        name = Path(raw).stem if raw.endswith((".py", ".ipynb")) else raw
        hits = [nb for nb in notebooks if name in (nb.stem, nb.stem[:2], nb.stem[3:])]
        if hits:
            selected.update(hits)
        else:
            unmatched.append(raw)
    return [nb for nb in notebooks if nb in selected], unmatched


def notebook_parameters(
    profile: str, stem: str, declared: Sequence[str], overrides: dict[str, Any], figures_dir: Path
) -> dict[str, Any]:
    """The parameters to inject into one notebook: only those it declares.

    Precedence: profile common < profile per-notebook < `overrides` (-p); run_all sets ``profile`` and
    ``figures_dir``.
    """
    table = PROFILES[profile]
    wanted = {"profile": profile, **table["common"], **table.get(stem, {}), **overrides}
    wanted.update(profile=profile, figures_dir=str(figures_dir))
    return {k: v for k, v in wanted.items() if k in declared}


def build_jobs(
    notebooks: Sequence[Path],
    profile: str,
    build_dir: Path,
    overrides: dict[str, Any] | None = None,
    publish_dir: Path | None = None,
    timeout: float | None = None,
) -> tuple[list[Job], list[str]]:
    """One `Job` per notebook for `profile`, and warnings about parameters that could not be passed."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    overrides = overrides or {}
    build_dir = Path(build_dir).resolve()
    publish_dir = Path(publish_dir).resolve() if publish_dir else publish_dir_for(profile, build_dir)
    jobs, warnings, declared_anywhere = [], [], set()
    for notebook in notebooks:
        notebook = Path(notebook).resolve()
        declared = declared_parameters(notebook)
        declared_anywhere.update(declared)
        missing = [k for k in COMMON_PARAMETERS if k not in declared]
        if missing:
            warnings.append(f"{notebook.stem} does not declare the common parameter(s) {', '.join(missing)}")
        stale = [k for k in PROFILES[profile].get(notebook.stem, {}) if k not in declared]
        if stale:
            warnings.append(f"PROFILES[{profile!r}][{notebook.stem!r}] sets {', '.join(stale)}, which "
                            f"{notebook.stem} does not declare (it declares: {', '.join(declared)})")
        staging = build_dir / profile / "staging" / notebook.stem
        jobs.append(
            Job(
                notebook=notebook,
                parameters=notebook_parameters(profile, notebook.stem, declared, overrides, staging),
                output_path=build_dir / profile / "executed" / f"{notebook.stem}.ipynb",
                staging_dir=staging,
                publish_dir=publish_dir,
                timeout=timeout,
                env={"EFFLLM_FIGURES": str(staging)},
            )
        )
    unknown = [k for k in overrides if k not in declared_anywhere]
    if unknown:
        warnings.append(f"-p {', '.join(unknown)}: no selected notebook declares it; ignored "
                        f"(declared: {', '.join(sorted(declared_anywhere)) or 'nothing'})")
    return jobs, warnings


# ---------------------------------------------------------------------------------------------------------
# Running one job


def _kill_process_tree(pid: int) -> None:
    """Kill the kernel `pid` and, where it leads its own process group, everything it started."""
    import signal

    try:
        group = os.getpgid(pid)
        if group != os.getpgid(0):  # never our own group
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kernel_manager_class(env: dict[str, str], time_limit: float | None = None,
                          timers: list[threading.Timer] | None = None):
    """An AsyncKernelManager that starts its kernel with `env` added to this process's environment.

    Per kernel rather than through os.environ, so parallel jobs cannot see each other's settings. With
    `time_limit`, the kernel is killed that many seconds after it started (papermill then fails the
    notebook with DeadKernelError); the timer goes into `timers` so the caller can cancel it.
    """
    import zmq
    from jupyter_client import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            kw["env"] = {**os.environ, **kw.get("env", {}), **env}
            # Encrypt the local kernel's sockets where jupyter_client can (>= 8.10); this also keeps
            # ipykernel's "running over TCP without encryption" warning out of the log.
            if hasattr(self, "transport_encryption") and zmq.has("curve"):
                self.transport_encryption = "auto"
            await super().start_kernel(**kw)
            pid = getattr(self.provisioner, "pid", None)
            if time_limit is not None and pid is not None:
                timer = threading.Timer(time_limit, _kill_process_tree, args=(pid,))
                timer.daemon = True
                timer.start()
                if timers is not None:
                    timers.append(timer)

    return KernelManager


def _move_atomic(src: Path, dst: Path) -> None:
    """Move `src` to `dst` so that `dst` is either the old file or the whole new one, never a part."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:  # another file system: copy beside the target, then rename
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        os.close(fd)
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        src.unlink()


def publish(staging_dir: Path, publish_dir: Path) -> list[str]:
    """Move every file under `staging_dir` into `publish_dir`, keeping sub-folders; return them relative."""
    published = []
    for src in sorted(p for p in staging_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(staging_dir)
        _move_atomic(src, publish_dir / rel)
        published.append(rel.as_posix())
    return published


def run_job(job: Job) -> JobResult:
    """Execute one notebook with papermill and publish its figures if it succeeded. Never raises."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    timers: list[threading.Timer] = []

    def result(status: str, figures: list[str], error: str | None = None) -> JobResult:
        seconds = round(time.perf_counter() - start, 2)
        if error and job.time_limit is not None and seconds >= job.time_limit:
            error = f"time limit of {job.time_limit:g} s exceeded, the kernel was stopped ({error})"
        return JobResult(job.name, status, seconds, figures, error, str(job.output_path))

    try:
        shutil.rmtree(job.staging_dir, ignore_errors=True)  # stale files must not be published
        job.staging_dir.mkdir(parents=True)
        job.output_path.parent.mkdir(parents=True, exist_ok=True)
        nb = read_notebook(job.notebook)
        if not has_parameters_cell(nb):
            return result("failed", [], f"{job.notebook.name} has no cell tagged 'parameters' "
                          "(add `# %% tags=[\"parameters\"]` above its parameters)")
        papermill.execute_notebook(
            nb,
            str(job.output_path),
            parameters=job.parameters,
            kernel_name="python3",
            language="python",
            progress_bar=False,
            execution_timeout=job.timeout,
            # The kernel's working folder. Not papermill's `cwd=`: that calls os.chdir, which is
            # process-wide and races between parallel jobs.
            resources={"metadata": {"path": str(job.notebook.parent)}},
            kernel_manager_class=_kernel_manager_class({"MPLBACKEND": "Agg", **job.env}, job.time_limit, timers),
        )
    except PapermillExecutionError as exc:
        return result("failed", [], f"{exc.ename}: {exc.evalue} (cell {exc.cell_index} of {job.output_path.name})")
    except Exception as exc:  # kernel died, timeout, unreadable notebook: a failed job, not a crashed run
        return result("failed", [], f"{type(exc).__name__}: {exc}")
    finally:
        for timer in timers:
            timer.cancel()
    try:
        figures = publish(job.staging_dir, job.publish_dir)
    except OSError as exc:
        return result("failed", [], f"publishing figures to {job.publish_dir} failed: {exc}")
    return result("ok", figures)


def run(jobs: Sequence[Job], executor: Executor, out: TextIO | None = None) -> list[JobResult]:
    """Run `jobs` on `executor`, printing a line as each finishes; results in the order of `jobs`."""
    out = out or sys.stdout
    futures = {executor.submit(job): i for i, job in enumerate(jobs)}
    results: list[JobResult | None] = [None] * len(jobs)
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            r = future.result()
            results[futures[future]] = r
            line = f"[{done}/{len(jobs)}] {r.notebook} {r.status} {r.seconds:.1f}s {len(r.figures)} figures"
            if r.error:
                line += f"\n      {r.error}"
            print(line, file=out, flush=True)
    finally:
        executor.shutdown()
    return [r for r in results if r is not None]


def format_summary(results: Sequence[JobResult], label: str = "notebook") -> str:
    width = max([len(label), *(len(r.notebook) for r in results)])
    lines = [f"{label:<{width}}  status  seconds  figures written", "-" * (width + 34)]
    for r in results:
        lines.append(f"{r.notebook:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {len(r.figures)}")
    failed = sum(r.status != "ok" for r in results)
    lines.append(f"{len(results) - failed} ok, {failed} failed")
    return "\n".join(lines)


def write_summary(path: Path, profile: str, publish_dir: Path, results: Sequence[JobResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "profile": profile,
        "publish_dir": str(publish_dir),
        "ok": all(r.status == "ok" for r in results),
        "notebooks": [asdict(r) for r in results],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Remote runs: execute anywhere, ship the files back, land them here


def _short_error(error: BaseException, limit: int = 600) -> str:
    """One line for a remote failure (Ray and submitit errors carry whole tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(error).__name__}: {text}"[:limit]


def run_job_isolated(job: Job) -> dict[str, Any]:
    """Run `job` in a private temporary folder of the machine that calls it; return its result fields with
    the bytes of the executed notebook and of every published file. What a Ray task or SLURM job sends
    back to `land`, so outputs need no file system shared with the submitting machine."""
    import platform

    with tempfile.TemporaryDirectory(prefix=f"effllm-{job.name}-") as tmp:
        folder = Path(tmp)
        staging = folder / "staging"
        parameters = dict(job.parameters)
        if "figures_dir" in parameters:
            parameters["figures_dir"] = str(staging)
        local = replace(job, parameters=parameters, output_path=folder / job.output_path.name,
                        staging_dir=staging, publish_dir=folder / "publish",
                        env={**job.env, "EFFLLM_FIGURES": str(staging)})
        result = run_job(local)
        files = {rel: (local.publish_dir / rel).read_bytes() for rel in result.figures}
        executed = local.output_path.read_bytes() if local.output_path.is_file() else None
    return {"result": asdict(result), "files": files, "executed": executed, "host": platform.node()}


def land(job: Job, outcome: dict[str, Any] | BaseException) -> JobResult:
    """Put what `run_job_isolated` sent back into this repository's layout: the executed notebook at
    `job.output_path`, and (only when the run succeeded) its files published from `job.staging_dir` into
    `job.publish_dir`. `outcome` is the exception instead when the task or job itself failed."""
    if isinstance(outcome, BaseException):
        return JobResult(job.name, "failed", 0.0, [], _short_error(outcome), None)
    fields = outcome["result"]
    executed = None
    if outcome.get("executed") is not None:
        write_atomic(job.output_path, outcome["executed"])
        executed = str(job.output_path)
    if fields["status"] != "ok":
        return JobResult(job.name, "failed", fields["seconds"], [], fields["error"], executed)
    shutil.rmtree(job.staging_dir, ignore_errors=True)
    for rel, data in outcome["files"].items():
        write_atomic(job.staging_dir / rel, data)
    try:
        figures = publish(job.staging_dir, job.publish_dir)
    except OSError as exc:
        return JobResult(job.name, "failed", fields["seconds"], [],
                         f"publishing figures to {job.publish_dir} failed: {exc}", executed)
    return JobResult(job.name, "ok", fields["seconds"], figures, None, executed)


# ---------------------------------------------------------------------------------------------------------
# Sweeps: one notebook over a parameter grid


def sweep_publish_dir(sweep_name: str, profile: str, build_dir: Path, publish_dir: Path | None = None) -> Path:
    """The sweep's figure folder: <profile's figure folder>/sweeps/<sweep>/, one sub-folder per run."""
    root = Path(publish_dir).resolve() if publish_dir else publish_dir_for(profile, Path(build_dir).resolve())
    return root / "sweeps" / sweep_name


def build_sweep_jobs(
    sweep: Any,
    notebooks: Sequence[Path],
    profile: str,
    build_dir: Path,
    overrides: dict[str, Any] | None = None,
    publish_dir: Path | None = None,
    timeout: float | None = None,
) -> tuple[list[Job], list[dict[str, Any]]]:
    """One `Job` per grid point of `sweep` (an `effllm.scale.Sweep`), and the grid points.

    Parameters: profile common < profile per-notebook < the sweep's `parameters` < `overrides` (-p) < the
    grid point. Executed copies go to build/<profile>/sweeps/<sweep>/<run-id>/, figures to
    `sweep_publish_dir(...)/<run-id>/`. Raises `effllm.scale.SweepError` for a notebook that matches
    nothing, or a parameter the notebook does not declare.
    """
    from effllm.scale import SweepError

    if profile not in PROFILES:
        raise SweepError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    overrides = overrides or {}
    selected, _ = select_notebooks(notebooks, [sweep.notebook])
    if len(selected) != 1:
        available = ", ".join(nb.stem for nb in notebooks) or "none"
        raise SweepError(f"sweep {sweep.name!r}: notebook {sweep.notebook!r} matches "
                         f"{len(selected)} notebooks; notebooks: {available} (give a stem, NN prefix or title)")
    notebook = Path(selected[0]).resolve()
    declared = declared_parameters(notebook)
    points, run_ids = sweep.points(), sweep.run_ids()
    swept = {key for point in points for key in point}
    undeclared = sorted((swept | set(sweep.parameters) | set(overrides)) - set(declared))
    if undeclared:
        raise SweepError(f"sweep {sweep.name!r}: {notebook.stem} does not declare {undeclared}; "
                         f"it declares: {', '.join(declared)}")
    clash = sorted(swept & set(overrides))
    if clash:
        raise SweepError(f"sweep {sweep.name!r}: -p {', '.join(clash)} would override the swept value(s); "
                         "change the sweep file's grid instead")
    build_dir = Path(build_dir).resolve()
    runs_dir = build_dir / profile / "sweeps" / sweep.name
    figures_root = sweep_publish_dir(sweep.name, profile, build_dir, publish_dir)
    jobs = []
    for run_id, point in zip(run_ids, points, strict=True):
        staging = runs_dir / run_id / "staging"
        wanted = {**sweep.parameters, **overrides, **point}
        jobs.append(Job(
            notebook=notebook,
            parameters=notebook_parameters(profile, notebook.stem, declared, wanted, staging),
            output_path=runs_dir / run_id / f"{notebook.stem}.ipynb",
            staging_dir=staging,
            publish_dir=figures_root / run_id,
            timeout=timeout,
            env={"EFFLLM_FIGURES": str(staging)},
            time_limit=sweep.resources.time_limit_s,
            run_id=run_id,
        ))
    return jobs, points


def write_sweep_summary(
    folder: Path,
    sweep: Any,
    profile: str,
    executor: str,
    jobs: Sequence[Job],
    points: Sequence[dict[str, Any]],
    results: Sequence[JobResult],
) -> tuple[Path, Path]:
    """summary.json and summary.csv in the sweep's figure folder (one row per run: run id, the swept
    parameters, status, seconds, figures relative to the folder, error), and parameters.json in the folder
    of every run that succeeded, so a figure's own folder says what produced it."""
    import csv
    import io

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for job, point, r in zip(jobs, points, results, strict=True):
        passed = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
        rows.append({
            "run_id": job.run_id, "parameters": point, "all_parameters": passed, "status": r.status,
            "seconds": r.seconds, "figures": [f"{job.run_id}/{f}" for f in r.figures], "error": r.error,
            "executed": r.executed,
        })
        if r.status == "ok":
            record = {"sweep": sweep.name, "run_id": job.run_id, "notebook": job.notebook.stem,
                      "profile": profile, "parameters": passed, "swept": point, "executed": r.executed}
            write_atomic(job.publish_dir / "parameters.json", (json.dumps(record, indent=2) + "\n").encode())
    payload = {
        "sweep": sweep.name, "notebook": jobs[0].notebook.stem if jobs else sweep.notebook,
        "profile": profile, "executor": executor, "resources": asdict(sweep.resources),
        "figures_dir": str(folder), "ok": all(r.status == "ok" for r in results), "runs": rows,
    }
    json_path, csv_path = folder / "summary.json", folder / "summary.csv"
    write_atomic(json_path, (json.dumps(payload, indent=2) + "\n").encode())
    keys = list(dict.fromkeys(k for point in points for k in point))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["run_id", *keys, "status", "seconds", "figures", "error"])
    for row in rows:
        values = [json.dumps(row["parameters"][k]) if isinstance(row["parameters"].get(k), list | dict)
                  else row["parameters"].get(k, "") for k in keys]
        writer.writerow([row["run_id"], *values, row["status"], row["seconds"], " ".join(row["figures"]),
                         row["error"] or ""])
    write_atomic(csv_path, text.getvalue().encode())
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------------------
# Command line


def _jobs_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 (notebooks run at once), got {text!r}")
    return value


def _timeout_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _parameter_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a Python name (e.g. -p max_new_tokens=32), got {text!r}"
        )
    if key in RESERVED_PARAMETERS:
        raise argparse.ArgumentTypeError(
            f"{key!r} is set by run_all.py; use --profile, or --figures-dir for where figures go"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0]
        raise argparse.ArgumentTypeError(
            f"value of {text!r} is not a YAML/JSON literal ({first_line}); quote it, e.g. -p {key}='\"...\"'"
        ) from None
    return key, value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the notebooks with papermill and regenerate their figures.",
        epilog="Profiles: "
        + "; ".join(f"{name}: model {table['common']['model_name']}" for name, table in PROFILES.items()),
    )
    parser.add_argument("--profile", default=None, choices=list(PROFILES),
                        help="parameter set and figure folder (default: the sweep file's profile, else default)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="notebooks to run: stem (00_quickstart), NN prefix (00) or title (quickstart)")
    parser.add_argument("--jobs", "-j", type=_jobs_arg, default=1, metavar="N", help="notebooks run at once (default: 1)")
    parser.add_argument("--list", action="store_true",
                        help="print the notebooks and the parameters they would get, then exit")
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", type=_parameter_arg,
                        default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter; VALUE is a YAML/JSON literal (repeatable)")
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build",
                        help="executed notebooks, staging folders and summary.json (default: build/)")
    parser.add_argument("--notebooks-dir", type=Path, default=REPO_ROOT / "notebooks",
                        help="folder of NN_title.py notebooks (default: notebooks/)")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="publish figures here instead of the profile's folder "
                        "(smoke: build/smoke/figures, default: figures, paper: figures/paper)")
    parser.add_argument("--timeout", type=_timeout_arg, default=None, metavar="SECONDS",
                        help="fail a notebook when one cell runs longer than this (default: no limit)")
    scale = parser.add_argument_group("sweeps (see README, Running at scale)")
    scale.add_argument("--sweep", type=Path, metavar="FILE",
                       help="run one notebook over the parameter grid of a YAML sweep file")
    scale.add_argument("--executor", choices=EXECUTOR_NAMES, default="local",
                       help="where sweep runs execute: local (--jobs at once), ray (a task per run), "
                       "slurm (a job per run through submitit) (default: %(default)s)")
    scale.add_argument("--address", metavar="ADDR",
                       help="ray: a running cluster (ray://HOST:10001 or HOST:6379); default: start a local Ray "
                       "with room for --jobs runs")
    scale.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition to submit to")
    scale.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help="slurm: submitit's cluster; 'local' runs the jobs as local processes, through the same "
                       "submission path (for tests and machines without SLURM) (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    notebooks_dir = args.notebooks_dir.resolve()
    notebooks = discover_notebooks(notebooks_dir)
    if not notebooks:
        parser.error(f"no notebooks in {notebooks_dir} (looked for {NOTEBOOK_PATTERN}, "
                     "the jupytext twins of NN_title.ipynb)")
    if args.sweep is not None:
        return main_sweep(parser, args, notebooks)
    if args.executor != "local" or args.address or args.slurm_partition:
        parser.error("--executor, --address and --slurm-partition apply to sweeps; give --sweep FILE")
    args.profile = args.profile or "default"
    if args.only:
        notebooks, unmatched = select_notebooks(notebooks, args.only)
        if unmatched:
            available = ", ".join(nb.stem for nb in discover_notebooks(notebooks_dir))
            parser.error(f"--only: no notebook matches {', '.join(map(repr, unmatched))}; "
                         f"notebooks: {available} (give a stem, its NN prefix or its title)")

    build_dir = args.build_dir.resolve()
    jobs, warnings = build_jobs(notebooks, args.profile, build_dir, dict(args.parameters),
                                args.figures_dir, args.timeout)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.list:
        for job in jobs:
            shown = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
            print(f"{job.name:<24} {json.dumps(shown)}")
        return 0

    publish_dir = jobs[0].publish_dir
    print(f"running {len(jobs)} notebook(s), profile {args.profile}, {args.jobs} at a time; "
          f"figures -> {publish_dir}", flush=True)
    results = run(jobs, LocalExecutor(args.jobs))
    summary_path = build_dir / args.profile / "summary.json"
    write_summary(summary_path, args.profile, publish_dir, results)
    print()
    print(format_summary(results))
    print(f"executed notebooks in {build_dir / args.profile / 'executed'}; summary in {summary_path}")
    return 0 if all(r.status == "ok" for r in results) else 1


def make_sweep_executor(args: argparse.Namespace, sweep: Any, runs_dir: Path) -> Executor:
    """The executor `--executor` names, sized from the sweep's resources (Ray / submitit imported here)."""
    from effllm.scale import RayExecutor, SubmititExecutor

    if args.executor == "local":
        return LocalExecutor(args.jobs)
    if args.executor == "ray":
        return RayExecutor(run_job_isolated, land, sweep.resources, address=args.address, local_runs=args.jobs)
    return SubmititExecutor(run_job_isolated, land, sweep.resources, folder=runs_dir / "submitit",
                            cluster=args.slurm_cluster, partition=args.slurm_partition, local_runs=args.jobs,
                            job_name=f"effllm-{sweep.name}")


def main_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, notebooks: Sequence[Path]) -> int:
    """`run_all.py --sweep FILE`: every grid point of the sweep file is one run of its notebook."""
    from effllm.scale import SweepError, load_sweep

    if args.only:
        parser.error("--only does not go with --sweep: the sweep file names its notebook")
    if args.executor != "ray" and args.address:
        parser.error(f"--address is for --executor ray; got --executor {args.executor}")
    if args.executor != "slurm" and args.slurm_partition:
        parser.error(f"--slurm-partition is for --executor slurm; got --executor {args.executor}")
    if args.executor == "slurm" and args.slurm_cluster == "slurm" and shutil.which("sbatch") is None:
        parser.error("--executor slurm: no SLURM on this machine (sbatch not found); run on a login node, or "
                     "use --slurm-cluster local to run the jobs here through submitit")
    try:
        sweep = load_sweep(args.sweep)
        if args.profile and sweep.profile and args.profile != sweep.profile:
            print(f"note: --profile {args.profile} replaces the sweep file's profile {sweep.profile}",
                  file=sys.stderr)
        profile = args.profile or sweep.profile or "default"
        build_dir = args.build_dir.resolve()
        jobs, points = build_sweep_jobs(sweep, notebooks, profile, build_dir, dict(args.parameters),
                                        args.figures_dir, args.timeout)
    except SweepError as error:
        parser.error(str(error))
    figures_root = sweep_publish_dir(sweep.name, profile, build_dir, args.figures_dir)
    runs_dir = build_dir / profile / "sweeps" / sweep.name
    if args.list:
        for job in jobs:
            shown = {k: v for k, v in job.parameters.items() if k != "figures_dir"}
            print(f"{job.run_id}  {json.dumps(shown)}")
        return 0
    try:
        executor = make_sweep_executor(args, sweep, runs_dir)
    except ImportError as error:
        parser.error(f"--executor {args.executor} needs {error.name}: pip install -e \".[scale]\" (ray, submitit)")
    except SweepError as error:
        parser.error(str(error))
    r = sweep.resources
    print(f"sweep {sweep.name}: {len(jobs)} run(s) of {jobs[0].notebook.stem}, profile {profile}, executor "
          f"{args.executor}; each run: {r.cpus} cpu, {r.gpus:g} gpu, memory {r.memory_gb or '-'} GB, "
          f"time limit {r.time_limit_min or '-'} min; figures -> {figures_root}", flush=True)
    results = run(jobs, executor)
    json_path, csv_path = write_sweep_summary(figures_root, sweep, profile, args.executor, jobs, points, results)
    print()
    print(format_summary(results, label="run"))
    print(f"executed notebooks in {runs_dir}; summary in {json_path} and {csv_path.name}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
