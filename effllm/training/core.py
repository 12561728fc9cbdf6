"""Exit training: configuration, the teacher pass, the training loops, checkpoints and the result cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from effllm import checks, io
from effllm.adapters import get_adapter
from effllm.models import cpu_supports_bfloat16
from effllm.paths import cache_dir
from effllm.training import losses
from effllm.training.data import corpus_windows, pack, self_distillation_prompts, self_distillation_sequences
from effllm.training.modules import EXIT_KINDS, ExitModules, build_exit_modules

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

    def replace(self, **changes: Any) -> ExitTrainingConfig:
        return dataclasses.replace(self, **changes)


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
}
# Tiny models: seconds, for tests (exits on layer 2 of 4).
TINY_OVERRIDES: dict[str, Any] = {"exit_layers": (2,), "corpora": ("python-docs",), "windows_per_corpus": 4,
                                  "seq_len": 32, "self_distill_prompts": 1, "answer_tokens": 8,
                                  "heldout_windows_per_corpus": 2,
                                  "steps": 6, "batch_tokens": 64, "batch_windows": 2, "eval_every": 3,
                                  "checkpoint_every": 3, "warmup_steps": 1, "top_k": 8}


def recipe(name: str = "default", model: str = "smollm2-135m", **overrides: Any) -> ExitTrainingConfig:
    """The configuration of recipe ``name`` for ``model`` (tiny models get :data:`TINY_OVERRIDES` first)."""
    checks.choice("recipe", name, RECIPES)
    settings: dict[str, Any] = {"model": model}
    if model.startswith("tiny-"):
        settings.update(TINY_OVERRIDES)
        if name in ("free",):
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
    payload = json.dumps({"config": config.to_dict(), "dtype": str(compute_dtype), "version": FORMAT_VERSION},
                         sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _data_key(config: ExitTrainingConfig, compute_dtype: torch.dtype, layers: tuple[int, ...]) -> str:
    fields = ("model", "corpora", "windows_per_corpus", "seq_len", "self_distill_prompts", "answer_tokens",
              "heldout_windows_per_corpus", "top_k", "seed")
    payload = {f: getattr(config, f) for f in fields}
    payload.update(layers=list(layers), dtype=str(compute_dtype), version=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def training_dir(model_name: str) -> Path:
    return cache_dir() / "exit_training" / model_name.replace("/", "--")


# --------------------------------------------------------------------------------------------------
# Running the model layer by layer (with gradients where they are wanted, and optional layer skipping)


def _split_t5(windows: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """T5 trains on (source, target) pairs: the first half of a window is the source, the second the target."""
    half = windows.shape[1] // 2
    return windows[:, :half], windows[:, half:]


def run_layers(model, ids: torch.LongTensor, skip: list[torch.Tensor | None] | None = None
               ) -> tuple[list[torch.Tensor], torch.LongTensor]:
    """States [h_0 (embeddings), h_1, ..., h_L] for windows ``ids`` [b, q], and the next-token labels [b, q']
    (-100 where there is none). Gradients flow where parameters require them. ``skip[i]``: a boolean [b, 1]
    or [b, q] mask of the rows / tokens that skip layer i (their state passes through unchanged)."""
    adapter = get_adapter(model)
    if adapter.family == "t5":
        source, target = _split_t5(ids)
        start = model.config.decoder_start_token_id
        decoder_input = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], dim=1)
        encoder = adapter.encode(source)
        hidden = adapter.embed(decoder_input)
        context = adapter.context(hidden, encoder_hidden_states=encoder)
        labels = target
    else:
        hidden = adapter.embed(ids)
        context = adapter.context(hidden)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], losses.IGNORE_INDEX)], dim=1)
    states = [hidden]
    for i in range(adapter.num_layers):
        new = adapter.run_layer(i, hidden, context)
        if skip is not None and skip[i] is not None:
            new = torch.where(skip[i].unsqueeze(-1), hidden, new)
        hidden = new
        states.append(hidden)
    return states, labels


# --------------------------------------------------------------------------------------------------
# The teacher pass: the original model's states and top-k distributions, once per data configuration


@dataclass
class TeacherData:
    """What the untouched model computes on the training and held-out windows."""

    train_ids: torch.LongTensor  # [n, q]
    heldout_ids: torch.LongTensor  # [m, q]
    train_topk_ids: torch.LongTensor  # [n, q', k] (q' = q, or the target half for T5)
    train_topk_logprobs: torch.Tensor  # [n, q', k]
    heldout_argmax: torch.LongTensor  # [m, q'] the final layer's greedy token
    train_states: dict[int, torch.Tensor]  # layer -> [n, q', d] (the fast path's inputs)
    heldout_states: dict[int, torch.Tensor]  # layer -> [m, q', d]
    heldout_agreement: list[float]  # per layer 1..L: argmax of the logit lens == final argmax
    heldout_nll: float  # mean next-token negative log-likelihood of the last layer
    meta: dict[str, Any] = field(default_factory=dict)


def build_windows(model, tokenizer, config: ExitTrainingConfig, progress: bool = True
                  ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Training windows (corpus windows + packed self-distillation answers) and held-out windows."""
    train = corpus_windows(tokenizer, config.corpora, config.windows_per_corpus, config.seq_len, config.seed)
    if config.self_distill_prompts and get_adapter(model).family != "t5":
        prompts = self_distillation_prompts(config.self_distill_prompts, config.seed)
        answers = self_distillation_sequences(model, tokenizer, prompts, config.answer_tokens, progress=progress)
        train = torch.cat([train, pack(answers, config.seq_len)])
    heldout = corpus_windows(tokenizer, config.corpora, config.heldout_windows_per_corpus, config.seq_len,
                             config.seed, split="validation")
    return train, heldout


@torch.no_grad()
def teacher_pass(model, tokenizer, config: ExitTrainingConfig, compute_dtype: torch.dtype, progress: bool = True,
                 batch_size: int = 4) -> TeacherData:
    """Run the untouched model over the training and held-out windows once; cached on disk (checksummed) by a
    hash of the data settings, so recipes that share their data share this pass."""
    layers = tuple(config.exit_layers) if config.fast_path else ()
    path = training_dir(config.model) / f"states-{_data_key(config, compute_dtype, layers)}.safetensors"
    try:
        tensors, meta = io.load_tensors(path, STATES_KIND)
        return _teacher_from_tensors(tensors, meta)
    except (io.ArtifactError, KeyError):  # missing, corrupt or incomplete: compute it again
        pass
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    started, cpu_started = time.perf_counter(), time.process_time()
    train_ids, heldout_ids = build_windows(model, tokenizer, config, progress)
    n_layers = adapter.num_layers
    tensors: dict[str, torch.Tensor] = {"train_ids": train_ids, "heldout_ids": heldout_ids}
    topk_ids, topk_logprobs, train_states = [], [], {layer: [] for layer in layers}
    heldout_states = {layer: [] for layer in layers}
    batches = [("train", s) for s in range(0, len(train_ids), batch_size)]
    batches += [("heldout", s) for s in range(0, len(heldout_ids), batch_size)]
    agree = torch.zeros(n_layers, dtype=torch.long)
    nll, counted, argmaxes = 0.0, 0, []
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        for part, start in tqdm(batches, desc="teacher pass", disable=not progress):
            ids = (train_ids if part == "train" else heldout_ids)[start:start + batch_size].to(device)
            states, labels = run_layers(model, ids)
            final = adapter.logits(states[-1]).float()  # [b, q', V]
            if part == "train":
                values, indices = torch.log_softmax(final, -1).topk(config.top_k, dim=-1)
                topk_ids.append(indices.int().cpu())
                topk_logprobs.append(values.cpu())
                for layer in layers:
                    train_states[layer].append(states[layer].float().cpu())
                continue
            target = final.argmax(-1)
            argmaxes.append(target.cpu())
            for layer in range(1, n_layers + 1):
                agree[layer - 1] += (adapter.logits(states[layer]).argmax(-1) == target).sum().cpu()
            for layer in layers:
                heldout_states[layer].append(states[layer].float().cpu())
            mask = labels != losses.IGNORE_INDEX
            nll += float(torch.nn.functional.cross_entropy(final[mask], labels[mask].to(device), reduction="sum"))
            counted += int(mask.sum())
    tensors["train_topk_ids"] = torch.cat(topk_ids)
    tensors["train_topk_logprobs"] = torch.cat(topk_logprobs)
    tensors["heldout_argmax"] = torch.cat(argmaxes)
    tensors["heldout_agreement"] = (agree.double() / tensors["heldout_argmax"].numel()).float()
    for layer in layers:
        tensors[f"train_states.{layer}"] = torch.cat(train_states[layer])
        tensors[f"heldout_states.{layer}"] = torch.cat(heldout_states[layer])
    meta = {"heldout_nll": nll / max(counted, 1), "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "train_windows": len(train_ids), "heldout_windows": len(heldout_ids), "layers": list(layers),
            "model": config.model}
    io.save_tensors(path, tensors, meta, STATES_KIND)
    return _teacher_from_tensors(tensors, meta)


def _teacher_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> TeacherData:
    layers = meta["layers"]
    return TeacherData(
        tensors["train_ids"].long(), tensors["heldout_ids"].long(), tensors["train_topk_ids"].long(),
        tensors["train_topk_logprobs"].float(), tensors["heldout_argmax"].long(),
        {layer: tensors[f"train_states.{layer}"] for layer in layers},
        {layer: tensors[f"heldout_states.{layer}"] for layer in layers},
        tensors["heldout_agreement"].tolist(), float(meta["heldout_nll"]), meta)


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def exit_agreement(model, exits: ExitModules, teacher: TeacherData, layers: list[int], split: str = "heldout",
                   windows: int | None = None) -> dict[int, float]:
    """Top-1 agreement of each exit in ``layers`` with the untouched last layer, from the cached states of the
    frozen backbone (the model is not run again): on the held-out windows, or (``split="train"``) on the
    first ``windows`` training windows, which tells fitting from generalising."""
    adapter = get_adapter(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if split == "heldout":
        states, target = teacher.heldout_states, teacher.heldout_argmax
    else:
        states, target = teacher.train_states, teacher.train_topk_ids[..., 0]
    target = target[:windows]
    result = {}
    for layer in layers:
        hits = 0
        for start in range(0, len(target), 4):  # 4 windows at a time: whole windows suit every exit kind
            hidden = exits(layer, states[layer][start:min(start + 4, len(target))].to(device)).to(dtype)
            hits += int((adapter.logits(hidden).argmax(-1).cpu() == target[start:start + 4]).sum())
        result[layer] = hits / target.numel()
    return result


@torch.no_grad()
def heldout_metrics(model, exits: ExitModules | None, teacher: TeacherData, batch_size: int = 4
                    ) -> tuple[list[float], float]:
    """Per-layer held-out top-1 agreement with the untouched last layer (exits applied where trained) and the
    last layer's mean next-token NLL, from a full pass of ``model`` (for a trained backbone)."""
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    agree = torch.zeros(n_layers, dtype=torch.long)
    nll, counted, offset = 0.0, 0, 0
    device = next(model.parameters()).device
    for start in range(0, len(teacher.heldout_ids), batch_size):
        ids = teacher.heldout_ids[start:start + batch_size].to(device)
        states, labels = run_layers(model, ids)
        target = teacher.heldout_argmax[offset:offset + len(ids)].to(device)
        offset += len(ids)
        for layer in range(1, n_layers + 1):
            hidden = states[layer] if exits is None or layer == n_layers else exits(layer, states[layer])
            agree[layer - 1] += int((adapter.logits(hidden).argmax(-1) == target).sum())
        final = adapter.logits(states[-1]).float()
        mask = labels != losses.IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(final[mask], labels[mask], reduction="sum"))
        counted += int(mask.sum())
    return (agree.double() / teacher.heldout_argmax.numel()).tolist(), nll / max(counted, 1)


# --------------------------------------------------------------------------------------------------
# Training


def _lr_at(config: ExitTrainingConfig, step: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of ``lr`` at the last step: a function of the step
    alone, so a resumed run follows the same schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _candidate_logits(adapter, hidden: torch.Tensor, topk_ids: torch.LongTensor, vocab: str
                      ) -> tuple[torch.Tensor, torch.LongTensor]:
    """Student logits and the teacher ids indexed into them: the full vocabulary, or (``batch``) only the
    rows some position of the batch has in its teacher top-k (a sampled softmax: the LM head product is
    the training step's main cost, and the rest of the vocabulary carries almost none of the teacher's mass)."""
    if vocab == "full":
        return adapter.logits(hidden), topk_ids
    rows, inverse = torch.unique(topk_ids, return_inverse=True)
    return adapter.logits(hidden, rows=rows), inverse


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step: losses per exit
    curve: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    seconds: float = 0.0  # wall-clock seconds of training (without the teacher pass)
    cpu_seconds: float = 0.0  # this process's CPU seconds of training (all threads): robust to a busy machine


def _trainable(model, exits: ExitModules | None) -> dict[str, torch.nn.Parameter]:
    named = {}
    if exits is not None:
        named.update({f"exits.{n}": p for n, p in exits.named_parameters() if p.requires_grad})
    named.update({f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad})
    return named


def _save_checkpoint(folder: Path, config: ExitTrainingConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    with io.staging(folder) as tmp:
        io.save_tensors(tmp / "params.safetensors", {n: p.detach() for n, p in params.items()},
                        {"step": state.step}, CHECKPOINT_KIND)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        io.write_json(tmp / "state.json", dataclasses.asdict(state))
        io.seal(tmp, CHECKPOINT_KIND, {"config": config.to_dict(), "step": state.step})


def _load_checkpoint(folder: Path, config: ExitTrainingConfig, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer) -> TrainState | None:
    """The saved state, loaded into ``params`` and ``optimizer``; None (and the folder removed) when it is
    missing, corrupt or from another configuration: the run then starts over."""
    import shutil

    if not folder.exists():
        return None
    try:
        meta = io.verify(folder, CHECKPOINT_KIND)
        if meta["config"] != json.loads(json.dumps(config.to_dict(), default=list)):
            raise io.ArtifactError("checkpoint of another configuration")
        tensors, _ = io.load_tensors(folder / "params.safetensors", CHECKPOINT_KIND)
        if set(tensors) != set(params):
            raise io.ArtifactError("checkpoint with other parameters")
        with torch.no_grad():
            for name, parameter in params.items():
                parameter.copy_(tensors[name])
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        return TrainState(**json.loads((folder / "state.json").read_text()))
    except (io.ArtifactError, KeyError, ValueError, RuntimeError, OSError):
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _add_lora(model, config: ExitTrainingConfig):
    """peft LoRA on every decoder linear of layers 1..``lora_top_layer`` (default: the deepest exit layer, or
    all layers when there is no exit), the rest of the model frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    adapter = get_adapter(model)
    top = config.lora_top_layer or (max(config.exit_layers) if config.exit_layers and config.loss == "distill"
                                    else adapter.num_layers)
    targets = [name for i in range(min(top, adapter.num_layers)) for name in adapter.linears(i)]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = inject_adapter_in_model(lora, model)
    return model


def _merge_lora(model) -> None:
    """Fold every LoRA update into its base linear and put the plain linear back (peft's merge_and_unload
    for a model that was injected, not wrapped)."""
    from peft.tuners.lora import LoraLayer

    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.merge()
            replacements.append((name, module.get_base_layer()))
    for name, base in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)


def _skip_masks(config: ExitTrainingConfig, n_layers: int, shape: tuple[int, int], step: int
                ) -> list[torch.Tensor | None] | None:
    if config.layer_dropout == 0:
        return None
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    rates = losses.layer_dropout_rates(n_layers, config.layer_dropout)
    cols = 1 if config.skip_unit == "sequence" else shape[1]
    masks: list[torch.Tensor | None] = []
    for rate in rates:
        masks.append(torch.rand(shape[0], cols, generator=generator) < rate if rate > 0 else None)
    return masks


def _window_loss(model, exits: ExitModules | None, config: ExitTrainingConfig, teacher: TeacherData,
                 rows: torch.LongTensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss on training windows ``rows`` (the model runs with gradients)."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_layers = adapter.num_layers
    ids = teacher.train_ids[rows].to(device)
    skip = _skip_masks(config, n_layers, (len(rows), ids.shape[1]), step)
    if skip is not None:
        skip = [None if m is None else m.to(device) for m in skip]
    states, labels = run_layers(model, ids, skip)

    def exit_state(layer: int) -> torch.Tensor:
        if exits is not None and layer < n_layers:
            return exits(layer, states[layer])
        return states[layer]

    parts: dict[str, torch.Tensor] = {}
    if config.loss == "distill":
        topk_ids = teacher.train_topk_ids[rows].to(device)
        topk_logprobs = teacher.train_topk_logprobs[rows].to(device)
        total, weights = 0.0, 0
        for layer in config.exit_layers:
            logits, index = _candidate_logits(adapter, exit_state(layer), topk_ids, config.vocab)
            parts[f"exit_{layer}"] = losses.distillation(logits, index, topk_logprobs)
            total, weights = total + layer * parts[f"exit_{layer}"], weights + layer
        loss = total / weights
        if config.backbone != "frozen" and config.anchor_weight > 0:
            logits, index = _candidate_logits(adapter, states[-1], topk_ids, config.vocab)
            parts["anchor"] = losses.distillation(logits, index, topk_logprobs)
            loss = loss + config.anchor_weight * parts["anchor"]
    elif config.loss == "weighted_ce":
        layers = list(range(1, n_layers + 1))
        layer_logits = [adapter.logits(exit_state(layer)) for layer in layers]
        loss = losses.weighted_ce(layer_logits, labels.to(device), layers)
    elif config.loss == "shallowdeep_kd_dyna":
        shallow = config.shallow_exit_layer
        normed = [adapter.final_norm(states[layer]) for layer in range(1, n_layers + 1)]
        loss = losses.shallowdeep_kd_dyna(adapter.logits(exit_state(shallow)), adapter.logits(states[-1]),
                                          labels.to(device), normed, shallow, config.distill_layer_alpha)
    else:  # layerskip
        enabled = losses.rotational_curriculum(n_layers, step, config.curriculum_rotation)
        scales = losses.layerskip_scales(n_layers, config.early_exit_scale, enabled)
        loss = sum(scale * losses.cross_entropy(adapter.logits(exit_state(layer)), labels.to(device))
                   for layer, scale in zip(range(1, n_layers + 1), scales, strict=True) if scale > 0)
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _cached_loss(model, exits: ExitModules, config: ExitTrainingConfig, flat: dict[Any, Any],
                 rows: torch.LongTensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The fast path's distillation loss on rows ``rows`` of the cached states: token rows [t, d] for
    position-wise exits, window rows [b, q, d] for ``layer`` exits (attention needs the window)."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    topk_ids = flat["ids"][rows].to(device)
    topk_logprobs = flat["logprobs"][rows].to(device)
    if exits.position_wise:  # [t, ...] -> [1, t, ...]
        topk_ids, topk_logprobs = topk_ids.unsqueeze(0), topk_logprobs.unsqueeze(0)
    parts, total, weights = {}, 0.0, 0
    for layer in config.exit_layers:
        states = flat[layer][rows].to(device)
        hidden = exits(layer, states.unsqueeze(0) if exits.position_wise else states)
        logits, index = _candidate_logits(adapter, hidden, topk_ids, config.vocab)
        parts[f"exit_{layer}"] = losses.distillation(logits, index, topk_logprobs)
        total, weights = total + layer * parts[f"exit_{layer}"], weights + layer
    return total / weights, {k: float(v.detach()) for k, v in parts.items()}


def _order(n: int, config: ExitTrainingConfig, epoch: int) -> torch.LongTensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))


def _batch_rows(n: int, batch: int, config: ExitTrainingConfig, step: int) -> torch.LongTensor:
    """The rows of step ``step``: consecutive slices of a fresh seeded permutation per epoch, a function of the
    step alone (so a resumed run draws what the uninterrupted one drew)."""
    per_epoch = max(n // batch, 1)
    epoch, index = divmod(step, per_epoch)
    return _order(n, config, epoch)[index * batch:(index + 1) * batch]


def train(model, tokenizer, config: ExitTrainingConfig, progress: bool = True, checkpoint_dir: Path | None = None,
          stop_after: int | None = None, on_step: Callable[[int], None] | None = None,
          teacher: TeacherData | None = None) -> tuple[Any, ExitModules | None, dict[str, Any]]:
    """Train exits on ``model`` as ``config`` says; returns (model, exits, result).

    The model is changed in place when the backbone trains (LoRA merged at the end). Checkpoints go to
    ``checkpoint_dir`` every ``checkpoint_every`` steps, and a run given the same folder resumes from its
    checkpoint. ``stop_after`` ends the run after that many steps in all (tests: an interrupted run)."""
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    for layer in config.exit_layers:
        checks.layer("exit_layers", layer, n_layers, high=n_layers - 1)
    if config.shallow_exit_layer is not None:
        checks.layer("shallow_exit_layer", config.shallow_exit_layer, n_layers, high=n_layers - 1)
    device = next(model.parameters()).device
    compute_dtype = autocast_dtype(config, device)
    started, cpu_started = time.perf_counter(), time.process_time()
    if teacher is None:
        teacher = teacher_pass(model, tokenizer, config, compute_dtype, progress)
    teacher_seconds, teacher_cpu = time.perf_counter() - started, time.process_time() - cpu_started

    torch.manual_seed(config.seed)
    exits = build_exit_modules(model, config.exit_module, list(config.exit_layers)) if config.exit_module else None
    model.requires_grad_(False)
    if config.backbone == "lora":
        model = _add_lora(model, config)
    elif config.backbone == "full":
        model.requires_grad_(True)
    params = _trainable(model, exits)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    state = None
    if checkpoint_dir is not None:
        state = _load_checkpoint(checkpoint_dir, config, params, optimizer)
    state = state or TrainState()
    flat: dict[Any, Any] = {}
    tokens = config.fast_path and exits is not None and exits.position_wise
    if config.fast_path:  # token rows for position-wise exits, windows for the others
        shape = (-1,) if tokens else (len(teacher.train_ids), -1)
        flat = {layer: teacher.train_states[layer].reshape(*shape, adapter.hidden_size) for layer in config.exit_layers}
        flat["ids"] = teacher.train_topk_ids.reshape(*shape, config.top_k)
        flat["logprobs"] = teacher.train_topk_logprobs.reshape(*shape, config.top_k)
    n_rows = len(flat["ids"]) if config.fast_path else len(teacher.train_ids)
    batch = config.batch_tokens if tokens else config.batch_windows
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    was_training = model.training
    model.train(config.backbone != "frozen")
    bar = tqdm(range(state.step, last), desc=f"exit training ({config.model})", disable=not progress,
               initial=state.step, total=config.steps)
    clock, cpu_clock = time.perf_counter(), time.process_time()
    for step in bar:
        rows = _batch_rows(n_rows, batch, config, step)
        torch.manual_seed(config.seed * 1_000_033 + step)  # dropout inside the model: a function of the step too
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config, step)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            if config.fast_path:
                loss, parts = _cached_loss(model, exits, config, flat, rows)
            else:
                loss, parts = _window_loss(model, exits, config, teacher, rows, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step = step + 1
        state.history.append({"step": state.step, "loss": float(loss.detach()), **parts})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if on_step is not None:
            on_step(state.step)
        if exits is not None and config.fast_path and (state.step % config.eval_every == 0 or state.step == last):
            agreement = exit_agreement(model, exits, teacher, list(config.exit_layers))
            fitted = exit_agreement(model, exits, teacher, list(config.exit_layers), "train",
                                    windows=len(teacher.heldout_ids))
            now = state.seconds + time.perf_counter() - clock
            cpu_now = state.cpu_seconds + time.process_time() - cpu_clock
            state.curve.append({"step": state.step, "minutes": (teacher_seconds + now) / 60,
                                "cpu_minutes": (teacher_cpu + cpu_now) / 60,
                                **{f"agreement_{k}": v for k, v in agreement.items()},
                                **{f"train_agreement_{k}": v for k, v in fitted.items()}})
        if checkpoint_dir is not None and (state.step % config.checkpoint_every == 0) and state.step < config.steps:
            state.seconds += time.perf_counter() - clock
            state.cpu_seconds += time.process_time() - cpu_clock
            clock, cpu_clock = time.perf_counter(), time.process_time()
            _save_checkpoint(checkpoint_dir, config, params, optimizer, state)
    state.seconds += time.perf_counter() - clock
    state.cpu_seconds += time.process_time() - cpu_clock
    model.train(was_training)
    model.requires_grad_(False)
    if exits is not None:
        exits.requires_grad_(False).eval()
    if config.backbone == "lora":
        _merge_lora(model)
    result = {"config": config.to_dict(), "compute_dtype": str(compute_dtype).removeprefix("torch."),
              "steps_done": state.step, "teacher_pass_minutes": teacher_seconds / 60,
              "teacher_pass_cpu_minutes": teacher_cpu / 60, "training_minutes": state.seconds / 60,
              "training_cpu_minutes": state.cpu_seconds / 60, "threads": torch.get_num_threads(), "loss_history": state.history, "agreement_curve": state.curve,
              "teacher_meta": teacher.meta}
    if state.step >= config.steps:
        result.update(_final_metrics(model, exits, config, teacher))
    return model, exits, result


@torch.no_grad()
def _final_metrics(model, exits: ExitModules | None, config: ExitTrainingConfig, teacher: TeacherData
                   ) -> dict[str, Any]:
    n_layers = get_adapter(model).num_layers
    before = list(teacher.heldout_agreement)
    if config.backbone == "frozen" and config.fast_path:
        after = list(before)  # layers without an exit are unchanged: the backbone did not move
        for layer, value in exit_agreement(model, exits, teacher, list(config.exit_layers)).items():
            after[layer - 1] = value
        nll_after = teacher.heldout_nll
    else:
        after, nll_after = heldout_metrics(model, exits, teacher)
    return {
        "heldout_tokens": int(teacher.heldout_argmax.numel()),
        "agreement_before": {str(layer): before[layer - 1] for layer in range(1, n_layers + 1)},
        "agreement_after": {str(layer): after[layer - 1] for layer in range(1, n_layers + 1)},
        "perplexity_before": math.exp(teacher.heldout_nll),
        "perplexity_after": math.exp(nll_after),
        "perplexity_ratio": math.exp(nll_after - teacher.heldout_nll),
    }
