"""Exit training: the training loops, checkpoints and LoRA. The configuration (:mod:`effllm.training.config`),
the teacher pass (:mod:`effllm.training.teacher`) and the evaluation (:mod:`effllm.training.evaluation`) are
re-exported here, where they have always been importable."""

from __future__ import annotations

import dataclasses
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
from effllm.decoding.exits import exit_logits
from effllm.training import losses
from effllm.training.config import (  # noqa: F401 (re-exported)
    AUTOCAST,
    BACKBONES,
    CHECKPOINT_KIND,
    FORMAT_VERSION,
    LOSSES,
    RECIPES,
    RESULT_KIND,
    SKIP_UNITS,
    STATES_KIND,
    TINY_OVERRIDES,
    VOCAB,
    ExitTrainingConfig,
    autocast_dtype,
    cache_key,
    data_key,
    recipe,
    training_dir,
)
from effllm.training.evaluation import exit_agreement, heldout_metrics
from effllm.training.modules import ExitModules, build_exit_modules
from effllm.training.teacher import TeacherData, build_windows, run_layers, teacher_pass  # noqa: F401

# --------------------------------------------------------------------------------------------------
# Training


def _lr_at(config: ExitTrainingConfig, step: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth of ``lr`` at the last step: a function of the step
    alone, so a resumed run follows the same schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _candidate_logits(adapter, layer: int, hidden: torch.Tensor, exits: ExitModules | None,
                      topk_ids: torch.LongTensor, vocab: str) -> tuple[torch.Tensor, torch.LongTensor]:
    """Student logits and the teacher ids indexed into them: the full vocabulary, or (``batch``) only the
    rows some position of the batch has in its teacher top-k (a sampled softmax: the LM head product is
    the training step's main cost, and the rest of the vocabulary carries almost none of the teacher's mass)."""
    if vocab == "full":
        return exit_logits(adapter, layer, hidden, exits), topk_ids
    rows, inverse = torch.unique(topk_ids, return_inverse=True)
    return exit_logits(adapter, layer, hidden, exits, rows), inverse


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
    counted = teacher.counted("train")[rows].to(device)  # task examples: the answer positions only
    labels = torch.where(counted, labels.to(device), torch.full_like(labels.to(device), losses.IGNORE_INDEX))

    parts: dict[str, torch.Tensor] = {}
    if config.loss == "distill":
        topk_ids = teacher.train_topk_ids[rows].to(device)
        topk_logprobs = teacher.train_topk_logprobs[rows].to(device)
        total, weights = 0.0, 0
        for layer in config.exit_layers:
            logits, index = _candidate_logits(adapter, layer, states[layer], exits, topk_ids, config.vocab)
            parts[f"exit_{layer}"] = losses.distillation(logits, index, topk_logprobs, counted)
            total, weights = total + layer * parts[f"exit_{layer}"], weights + layer
        loss = total / weights
        if config.backbone != "frozen" and config.anchor_weight > 0:
            logits, index = _candidate_logits(adapter, n_layers, states[-1], None, topk_ids, config.vocab)
            parts["anchor"] = losses.distillation(logits, index, topk_logprobs, counted)
            loss = loss + config.anchor_weight * parts["anchor"]
    elif config.loss == "weighted_ce":
        layers = list(range(1, n_layers + 1))
        layer_logits = [exit_logits(adapter, layer, states[layer], exits) for layer in layers]
        loss = losses.weighted_ce(layer_logits, labels.to(device), layers)
    elif config.loss == "shallowdeep_kd_dyna":
        shallow = config.shallow_exit_layer
        normed = [adapter.final_norm(states[layer]) for layer in range(1, n_layers + 1)]
        loss = losses.shallowdeep_kd_dyna(exit_logits(adapter, shallow, states[shallow], exits),
                                          exit_logits(adapter, n_layers, states[-1]),
                                          labels.to(device), normed, shallow, config.distill_layer_alpha)
    else:  # layerskip
        enabled = losses.rotational_curriculum(n_layers, step, config.curriculum_rotation)
        scales = losses.layerskip_scales(n_layers, config.early_exit_scale, enabled)
        loss = sum(scale * losses.cross_entropy(exit_logits(adapter, layer, states[layer], exits), labels.to(device))
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
        hidden = states.unsqueeze(0) if exits.position_wise else states
        logits, index = _candidate_logits(adapter, layer, hidden, exits, topk_ids, config.vocab)
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


def _fast_path_rows(teacher: TeacherData, config: ExitTrainingConfig, hidden_size: int, tokens: bool
                    ) -> dict[Any, Any]:
    """The fast path's cached inputs: token rows [t, ...] for position-wise exits, windows [n, q, ...] for the
    others; empty off the fast path."""
    if not config.fast_path:
        return {}
    shape = (-1,) if tokens else (len(teacher.train_ids), -1)
    flat: dict[Any, Any] = {layer: teacher.train_states[layer].reshape(*shape, hidden_size)
                            for layer in config.exit_layers}
    flat["ids"] = teacher.train_topk_ids.reshape(*shape, config.top_k)
    flat["logprobs"] = teacher.train_topk_logprobs.reshape(*shape, config.top_k)
    if tokens and teacher.train_mask is not None:  # task examples: train on the answer positions only
        keep = teacher.train_mask.reshape(-1)
        flat = {key: value[keep] for key, value in flat.items()}
    return flat


def _curve_point(model, exits: ExitModules, config: ExitTrainingConfig, teacher: TeacherData, step: int,
                 seconds: tuple[float, float]) -> dict[str, Any]:
    """One point of the agreement curve: held-out and training agreement of every exit after ``step`` steps,
    against the (wall, CPU) seconds spent so far, teacher pass included."""
    agreement = exit_agreement(model, exits, teacher, list(config.exit_layers))
    fitted = exit_agreement(model, exits, teacher, list(config.exit_layers), "train", windows=len(teacher.heldout_ids))
    return {"step": step, "minutes": seconds[0] / 60, "cpu_minutes": seconds[1] / 60,
            **{f"agreement_{k}": v for k, v in agreement.items()},
            **{f"train_agreement_{k}": v for k, v in fitted.items()}}


def train(model, tokenizer, config: ExitTrainingConfig, progress: bool = True, checkpoint_dir: Path | None = None,
          stop_after: int | None = None, on_step: Callable[[int], None] | None = None,
          teacher: TeacherData | None = None) -> tuple[Any, ExitModules | None, dict[str, Any]]:
    """Train exits on ``model`` as ``config`` says; returns (model, exits, result).

    The model is changed in place when the backbone trains (LoRA merged at the end). Checkpoints go to
    ``checkpoint_dir`` every ``checkpoint_every`` steps, and a run given the same folder resumes from its
    checkpoint. ``stop_after`` ends the run after that many steps in all (tests: an interrupted run)."""
    adapter = get_adapter(model)
    _check_layers(config, adapter.num_layers)
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
    tokens = config.fast_path and exits is not None and exits.position_wise
    flat = _fast_path_rows(teacher, config, adapter.hidden_size, tokens)
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
            now = state.seconds + time.perf_counter() - clock
            cpu_now = state.cpu_seconds + time.process_time() - cpu_clock
            state.curve.append(_curve_point(model, exits, config, teacher, state.step,
                                            (teacher_seconds + now, teacher_cpu + cpu_now)))
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
    result = _result(config, compute_dtype, state, teacher, (teacher_seconds, teacher_cpu))
    if state.step >= config.steps:
        result.update(_final_metrics(model, exits, config, teacher))
    return model, exits, result


def _check_layers(config: ExitTrainingConfig, n_layers: int) -> None:
    for layer in config.exit_layers:
        checks.layer("exit_layers", layer, n_layers, high=n_layers - 1)
    if config.shallow_exit_layer is not None:
        checks.layer("shallow_exit_layer", config.shallow_exit_layer, n_layers, high=n_layers - 1)


def _result(config: ExitTrainingConfig, compute_dtype: torch.dtype, state: TrainState, teacher: TeacherData,
            teacher_seconds: tuple[float, float]) -> dict[str, Any]:
    """The run's record: configuration, precision, steps, (wall, CPU) minutes of the teacher pass and of training,
    the loss history and the agreement curve."""
    return {"config": config.to_dict(), "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "steps_done": state.step, "teacher_pass_minutes": teacher_seconds[0] / 60,
            "teacher_pass_cpu_minutes": teacher_seconds[1] / 60, "training_minutes": state.seconds / 60,
            "training_cpu_minutes": state.cpu_seconds / 60, "threads": torch.get_num_threads(),
            "loss_history": state.history, "agreement_curve": state.curve, "teacher_meta": teacher.meta}


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
        "heldout_tokens": int(teacher.counted("heldout").sum()),
        "agreement_before": {str(layer): before[layer - 1] for layer in range(1, n_layers + 1)},
        "agreement_after": {str(layer): after[layer - 1] for layer in range(1, n_layers + 1)},
        "perplexity_before": math.exp(teacher.heldout_nll),
        "perplexity_after": math.exp(nll_after),
        "perplexity_ratio": math.exp(nll_after - teacher.heldout_nll),
    }

