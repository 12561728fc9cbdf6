"""Exit training's configuration: :class:`ExitTrainingConfig`, the recipes, the autocast precision and the
cache keys of results and teacher passes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effllm import checks
from effllm.paths import cache_dir
from effllm.precision import cpu_supports_bfloat16
from effllm.training.modules import EXIT_KINDS

LOSSES = ("distill", "weighted_ce", "shallowdeep_kd_dyna", "layerskip")
BACKBONES = ("frozen", "lora", "full")
AUTOCAST = ("auto", "bfloat16", "float32")
VOCAB = ("full", "batch")
SKIP_UNITS = ("sequence", "token")
RESULT_KIND = "exit-training"
CHECKPOINT_KIND = "exit-training-checkpoint"
STATES_KIND = "exit-training-states"
FORMAT_VERSION = 1  # part of every cache key: bump when what a configuration produces changes


@dataclass(frozen=True)
class ExitTrainingConfig:
    """Everything that decides an exit-training run (and so its cache key). Layers are 1-based.

    Backbone: ``frozen`` (only exit modules train), ``lora`` (peft LoRA on the decoder linears of layers
    1..``lora_top_layer``, merged into the weights at the end) or ``full``. Loss: ``distill`` (the exits
    and, for a trainable backbone, the last layer (weight ``anchor_weight``) learn the original model's
    top-``top_k`` distribution), ``weighted_ce`` (CALM), ``shallowdeep_kd_dyna`` (FREE, with
    ``shallow_exit_layer`` and ``distill_layer_alpha``) or ``layerskip`` (LayerSkip's early-exit loss with
    ``early_exit_scale`` and ``curriculum_rotation``). ``layer_dropout`` > 0 skips layer l with LayerSkip's
    rate p_l (per ``skip_unit``: a whole sequence or each token, seed 003's stochastic skipping).
    """

    model: str = "smollm2-135m"
    exit_layers: tuple[int, ...] = (20,)
    exit_module: str | None = "mlp2"
    backbone: str = "frozen"
    loss: str = "distill"
    shallow_exit_layer: int | None = None
    distill_layer_alpha: float = 0.5
    anchor_weight: float = 1.0
    early_exit_scale: float = 1.0
    curriculum_rotation: int = 1
    layer_dropout: float = 0.0
    skip_unit: str = "sequence"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_top_layer: int | None = None
    # task-trained exits: the task's answer examples (prompt -> reference answer, the seeds' fine-tuning data) in
    # place of the corpora and the self-distillation answers; the loss and the agreement count answer tokens only
    task: str | None = None
    task_examples: int = 256
    heldout_task_examples: int = 32
    task_max_len: int = 256
    corpora: tuple[str, ...] = ("python-docs", "python-code")
    windows_per_corpus: int = 64
    seq_len: int = 128
    self_distill_prompts: int = 16
    answer_tokens: int = 64
    heldout_windows_per_corpus: int = 8
    top_k: int = 32
    vocab: str = "batch"
    steps: int = 300
    batch_tokens: int = 1024
    batch_windows: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    eval_every: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    autocast: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
        object.__setattr__(self, "corpora", tuple(self.corpora))
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model name (see effllm.models.load_model); got {self.model!r}")
        for layer in self.exit_layers:
            checks.positive_int("exit_layers", layer, hint=" (1-based layer numbers)")
        if len(set(self.exit_layers)) != len(self.exit_layers):
            raise ValueError(f"exit_layers must not repeat a layer; got {self.exit_layers}")
        if self.exit_module is not None:
            checks.choice("exit_module", self.exit_module, EXIT_KINDS)
        checks.choice("backbone", self.backbone, BACKBONES)
        checks.choice("loss", self.loss, LOSSES)
        checks.choice("skip_unit", self.skip_unit, SKIP_UNITS)
        checks.choice("autocast", self.autocast, AUTOCAST)
        checks.choice("vocab", self.vocab, VOCAB)
        if self.backbone == "frozen" and self.exit_module is None:
            raise ValueError("backbone='frozen' with exit_module=None trains nothing: choose an exit_module "
                             f"({', '.join(EXIT_KINDS)}) or backbone='lora' / 'full'")
        if self.loss == "distill" and not self.exit_layers:
            raise ValueError("loss='distill' needs at least one exit layer in exit_layers")
        if self.loss == "shallowdeep_kd_dyna":
            checks.positive_int("shallow_exit_layer", self.shallow_exit_layer,
                                hint=" (FREE's shallow model depth; required by shallowdeep_kd_dyna)")
        elif self.shallow_exit_layer is not None:
            checks.positive_int("shallow_exit_layer", self.shallow_exit_layer)
        if self.loss != "distill" and self.backbone == "frozen" and self.exit_module is None:
            raise ValueError(f"loss={self.loss!r} with a frozen backbone needs an exit_module")
        checks.number("distill_layer_alpha", self.distill_layer_alpha, low=0)
        checks.number("anchor_weight", self.anchor_weight, low=0)
        checks.number("early_exit_scale", self.early_exit_scale, low=0)
        checks.positive_int("curriculum_rotation", self.curriculum_rotation)
        checks.fraction("layer_dropout", self.layer_dropout, one=False)
        checks.positive_int("lora_rank", self.lora_rank)
        checks.number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        if self.lora_top_layer is not None:
            checks.positive_int("lora_top_layer", self.lora_top_layer)
        if self.task is not None:
            _check_task(self.task)
            checks.positive_int("task_examples", self.task_examples)
            checks.positive_int("heldout_task_examples", self.heldout_task_examples)
            checks.integer("task_max_len", self.task_max_len, low=8)
            if self.exit_module == "layer":
                raise ValueError("task training counts answer tokens only, which needs position-wise exits; "
                                 f"exit_module='layer' (an attention exit) trains on whole windows: choose one of "
                                 f"{', '.join(k for k in EXIT_KINDS if k != 'layer')}")
        if not self.corpora:
            raise ValueError("corpora must name at least one data set (e.g. 'python-docs')")
        checks.integer("windows_per_corpus", self.windows_per_corpus, low=0)
        checks.integer("seq_len", self.seq_len, low=8)
        checks.integer("self_distill_prompts", self.self_distill_prompts, low=0)
        checks.integer("answer_tokens", self.answer_tokens, low=0)
        checks.positive_int("heldout_windows_per_corpus", self.heldout_windows_per_corpus)
        checks.positive_int("top_k", self.top_k)
        checks.positive_int("steps", self.steps)
        checks.positive_int("batch_tokens", self.batch_tokens)
        checks.positive_int("batch_windows", self.batch_windows)
        checks.number("lr", self.lr, low=0, low_open=True)
        checks.number("weight_decay", self.weight_decay, low=0)
        checks.integer("warmup_steps", self.warmup_steps, low=0)
        checks.positive_int("eval_every", self.eval_every)
        checks.positive_int("checkpoint_every", self.checkpoint_every)
        checks.integer("seed", self.seed, low=0)

    @property
    def fast_path(self) -> bool:
        """Frozen backbone and distillation: the states are computed once (teacher pass) and the exits train on
        them without running the model again (position-wise exits on token rows, ``layer`` exits on windows)."""
        return self.backbone == "frozen" and self.loss == "distill"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for cache keys: without the task fields when no task is set, so that the keys (and the
        cached results) of the corpus recipes stay what they were before task training existed."""
        settings = self.to_dict()
        if self.task is None:
            for name in TASK_FIELDS:
                settings.pop(name)
        return settings

    def replace(self, **changes: Any) -> ExitTrainingConfig:
        return dataclasses.replace(self, **changes)


TASK_FIELDS = ("task", "task_examples", "heldout_task_examples", "task_max_len")
# The built-in tasks with a train and a validation split (task training never sees an evaluation prompt)
TRAINABLE_TASKS = ("arithmetic", "docstrings", "squad", "samsum", "cnn_dailymail", "gsm8k")


def _check_task(task: Any) -> None:
    names = task.split("+") if isinstance(task, str) else [task]
    for name in names:
        if name not in TRAINABLE_TASKS:
            raise ValueError(f"task must be one of {', '.join(TRAINABLE_TASKS)} or several joined by '+' (tasks "
                             f"with a train split: humaneval and alpaca have none to train on); got {task!r}")


# The recipes. `default` is the measured best within 20 minutes on a 2-core CPU (see the package docstring);
# the others reproduce the seeds' training set-ups at CPU size.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "calm": {"exit_module": None, "backbone": "lora", "loss": "weighted_ce", "exit_layers": (), "steps": 60},
    "free": {"exit_module": None, "backbone": "lora", "loss": "shallowdeep_kd_dyna", "shallow_exit_layer": 20,
             "exit_layers": (20,), "steps": 60},
    "layerskip": {"exit_module": None, "backbone": "lora", "loss": "layerskip", "layer_dropout": 0.1,
                  "curriculum_rotation": 4, "exit_layers": (), "steps": 60},
    "lora-anchor": {"exit_module": "mlp", "backbone": "lora", "loss": "distill", "steps": 60, "eval_every": 100},
    "paper": {"corpora": ("samsum",), "self_distill_prompts": 0},
    # exits trained on the tasks the claims are scored on (prompt -> reference answer, loss on the answer)
    "task": {"task": "arithmetic+docstrings", "exit_layers": (10, 15, 20)},
    # seed 001's fine-tuning of T5-large per data set (README: weighted_ce for CALM and static exiting,
    # shallowdeep_kd_dyna with the shallow exit at decoder layer 6 for FREE; the whole model trains), source ->
    # target on the task's train split; the data set by --set task=squad (samsum here)
    "seed001-calm": {"task": "samsum", "exit_module": None, "backbone": "full", "loss": "weighted_ce",
                     "exit_layers": (), "corpora": ("samsum",), "self_distill_prompts": 0, "task_examples": 4096,
                     "heldout_task_examples": 256, "task_max_len": 1024, "steps": 2000},
    "seed001-free": {"task": "samsum", "exit_module": None, "backbone": "full", "loss": "shallowdeep_kd_dyna",
                     "shallow_exit_layer": 6, "exit_layers": (6,), "corpora": ("samsum",), "self_distill_prompts": 0,
                     "task_examples": 4096, "heldout_task_examples": 256, "task_max_len": 1024, "steps": 2000},
}
# Tiny models: seconds, for tests (exits on layer 2 of 4).
TINY_OVERRIDES: dict[str, Any] = {"exit_layers": (2,), "corpora": ("python-docs",), "windows_per_corpus": 4,
                                  "seq_len": 32, "self_distill_prompts": 1, "answer_tokens": 8,
                                  "heldout_windows_per_corpus": 2,
                                  "steps": 6, "batch_tokens": 64, "batch_windows": 2, "eval_every": 3,
                                  "checkpoint_every": 3, "warmup_steps": 1, "top_k": 8,
                                  "task_examples": 8, "heldout_task_examples": 4, "task_max_len": 256}


def recipe(name: str = "default", model: str = "smollm2-135m", **overrides: Any) -> ExitTrainingConfig:
    """The configuration of recipe ``name`` for ``model`` (tiny models get :data:`TINY_OVERRIDES` first)."""
    checks.choice("recipe", name, RECIPES)
    settings: dict[str, Any] = {"model": model}
    if model.startswith("tiny-"):
        settings.update(TINY_OVERRIDES)
        if name in ("free", "seed001-free"):
            settings["shallow_exit_layer"] = 2
            settings["exit_layers"] = (2,)
    settings.update({k: v for k, v in RECIPES[name].items()
                     if not (model.startswith("tiny-") and k in ("shallow_exit_layer", "exit_layers", "steps"))})
    settings.update(overrides)
    return ExitTrainingConfig(**settings)


def autocast_dtype(config: ExitTrainingConfig, device: torch.device) -> torch.dtype:
    """bfloat16 autocast on CUDA and on CPUs with native bfloat16, float32 elsewhere (``auto``): emulated
    bfloat16 is about 2x slower than float32 on an AVX2 CPU (measured; see effllm.models.default_dtype)."""
    if config.autocast != "auto":
        return getattr(torch, config.autocast)
    if device.type == "cuda" or (device.type == "cpu" and cpu_supports_bfloat16()):
        return torch.bfloat16
    return torch.float32


def cache_key(config: ExitTrainingConfig, compute_dtype: torch.dtype) -> str:
    """A hash of the configuration, the compute precision and the format version: the result cache's name."""
    payload = json.dumps({"config": config.key_dict(), "dtype": str(compute_dtype), "version": FORMAT_VERSION},
                         sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_key(config: ExitTrainingConfig, compute_dtype: torch.dtype, layers: tuple[int, ...]) -> str:
    fields = ("model", "corpora", "windows_per_corpus", "seq_len", "self_distill_prompts", "answer_tokens",
              "heldout_windows_per_corpus", "top_k", "seed")
    payload = {f: getattr(config, f) for f in fields}
    if config.task is not None:
        payload.update({f: getattr(config, f) for f in TASK_FIELDS})
    payload.update(layers=list(layers), dtype=str(compute_dtype), version=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def training_dir(model_name: str) -> Path:
    return cache_dir() / "exit_training" / model_name.replace("/", "--")


