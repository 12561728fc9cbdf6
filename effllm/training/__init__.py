"""Training a model to exit early: the seeds' fine-tuning, and fitted exit modules on a frozen model.

The early-exit papers' speed-ups come from models trained to exit: CALM and static exiting train with
``weighted_ce`` (every layer's loss through the shared head, w_l = l), FREE (seed 001) with
``shallowdeep_kd_dyna`` (the shallow model's and the deep model's losses plus a dynamic layer-wise
distillation, ``shallow_exit_layer``, ``distill_layer_alpha``), LayerSkip with layer dropout and an
early-exit loss. All of them are here (:mod:`effllm.training.losses`), for decoder-only models and the T5
decoder, with the backbone frozen, adapted with peft LoRA (merged at the end) or fully fine-tuned:

    from effllm.training import recipe, train_exits
    model, tokenizer, exits, result = train_exits(recipe("default", model="smollm2-135m"))
    model, tokenizer, exits, result = train_exits(recipe("free", model="tiny-t5"))

    model, tokenizer = load_model("smollm2-135m-ee")   # trained on first use with `default`, then cached
    exits = records.EXITS.get(model)                   # exit_transform(layer, hidden) -> hidden, or None

**The exit contract.** ``records.EXITS.get(model)`` (a plain attribute, not a submodule: effllm.records)
is ``exit_transform(layer: int, hidden: Tensor[b, q, d]) -> Tensor[b, q, d]``: 1-based layer, the result goes
through the model's final norm and LM head, position-wise (no attention, no cache), the identity at layers
without a trained exit; None when the training changed the model's own weights and left no exit module
(LoRA merged: the returned model simply is the fine-tuned model). ``exits.layers`` lists the trained layers.

**Attention exits** (``exit_module="layer"``, a copy of the last decoder layer run on h_l) are trained and
measured here but are not position-wise: a decoder using one needs its own K/V cache per exit layer, with
one entry for every earlier position computed from that position's h_l. With one exit layer (FREE's shallow
layer) every token reaches it, so the decoder fills that cache as each token's h_l appears, by running the
exit layer's K/V projections on it (or the whole exit layer where it checks the exit); a token that left at
a lower layer would need its state copied up first (CALM's state propagation). Not worth it on SmolLM2: 0.40 agreement against 0.46 for a position-wise exit at equal minutes (below).

**Task-trained exits** (``recipe("task")``, ``python -m effllm.training --recipe task``): the seeds fine-tune on
each task, input -> target. With ``task=`` (built-in: ``arithmetic``, ``docstrings``, joined by ``+``; the seeds'
data sets by name) the data are the task's prompts followed by their reference answers from its train split, held
out on its validation split, and the losses and the agreement count the answer positions only (the positions whose
label is an answer token); any loss and backbone of the recipes applies. Decoder-only models get prompt and answer in
one row; T5 gets the prompt as the encoder's input and the answer as the decoder's target (seed 001's seq2seq
fine-tuning), the source padding masked in the encoder and the cross-attention.

**Data without a hub** (:mod:`effllm.training.data`): windows of the built-in corpora and the original
model's own greedy answers to built-in prompts (self-distillation); the seeds' data sets by name
(``corpora=("samsum",)``, the ``paper`` recipe) through :func:`effllm.data.load`.

**What works on the embedded model** (SmolLM2-135M, 30 layers, float32 on a busy 2-core AVX2 VM, held-out
python-docs + python-code validation windows, 2048 tokens; top-1 agreement of layer 20 with the untouched
last layer; all exits trained by self-distillation on the same cached teacher pass: 128 corpus windows of
128 tokens plus the model's answers to 24 built-in prompts; 300 steps of 1024 tokens unless said):

| layer-20 exit | agreement | CPU minutes of training |
|---|---|---|
| none (logit lens) | 0.114 | 0 |
| `mlp` (copy of the last layer's MLP block) | 0.429 | 3.1 wall minutes (CPU time not recorded) |
| `mlp2` (copies of the last two MLP blocks) | 0.460 (0.652 on training windows) | 7.2 |
| `affine+mlp` | 0.466 (0.572 on training windows) | 6.7 |
| `layer` (copy of the whole last layer, attention; 300 steps of 8 windows) | 0.403 (0.443) | 8.3 |
| `mlp`, 900 steps | 0.488 (0.738) | 16.8 |
| `mlp` + LoRA rank 8 on layers 1-20 + KL anchor on the last layer, 40 steps of 4 windows | 0.158; perplexity x1.008 | 7.3 |

(``results/exit_training_experiments_smollm2-135m.json`` has the agreement-vs-minutes curves.) The exits fit
their training text much better than held-out text once they have capacity (0.65 against 0.46 for
``mlp2``), and held-out agreement still creeps up with steps (``mlp``: 0.468 at step 300, 0.488 at 900 of
a 900-step run). On this CPU one teacher pass (a forward of the original model per training token) costs
as much as hundreds of exit-training steps, so data, not steps, is the scarce part. An attention exit is
not better at equal minutes (0.40 against 0.46), so the exits stay position-wise. Training the backbone
(LoRA) runs the whole model forward and backward every step: 8 s a step of 512 tokens against 0.6 s for
1024 cached tokens, about 25 times the cost per token, and it gets nowhere in CPU minutes. The ``default`` recipe
is a frozen model with an ``mlp2`` exit at layer 20 (300 steps, to stay within 20 minutes on 2 cores).

**Runs** are seeded and deterministic (the same configuration gives the same numbers), show a tqdm bar,
write resumable checkpoints (sealed, checksummed folders of :mod:`effllm.io`; a corrupt one is refused and
the run starts over) and cache their result by a hash of the configuration (:func:`cache_key`).
``python -m effllm.training --model smollm2-135m --recipe default`` trains (or loads) and writes
``results/exit_training_<model>.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from effllm import io, records
from effllm.training.core import (
    RECIPES,
    RESULT_KIND,
    ExitTrainingConfig,
    autocast_dtype,
    cache_key,
    recipe,
    train,
    training_dir,
)
from effllm.training.modules import ExitModules, build_exit_modules

__all__ = ["RECIPES", "ExitModules", "ExitTrainingConfig", "cache_key", "load_exit_trained", "load_task_trained", "recipe",
           "result_folder", "train", "train_exits"]

EXIT_MODULES_KIND = "exit-modules"
MODEL_WEIGHTS_KIND = "exit-trained-weights"


def result_folder(config: ExitTrainingConfig, compute_dtype: torch.dtype) -> Path:
    """Where the trained result of ``config`` is cached: ``cache_dir()/exit_training/<model>/<cache key>``."""
    return training_dir(config.model) / cache_key(config, compute_dtype)


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict without second names of one tensor (tied embeddings), for safetensors."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state


def _save(folder: Path, config: ExitTrainingConfig, model, exits: ExitModules | None, result: dict[str, Any]) -> None:
    with io.staging(folder) as tmp:
        if exits is not None:
            io.save_tensors(tmp / "exits.safetensors", exits.state_dict(),
                            {"kind": exits.kind, "layers": exits.layers}, EXIT_MODULES_KIND)
        if config.backbone != "frozen":
            io.save_tensors(tmp / "model.safetensors", _unique_state(model), {"model": config.model},
                            MODEL_WEIGHTS_KIND)
        io.write_json(tmp / "result.json", result)
        io.seal(tmp, RESULT_KIND, {"config": config.to_dict()})


def _load(folder: Path, config: ExitTrainingConfig, model) -> tuple[Any, ExitModules | None, dict[str, Any]]:
    import json

    io.verify(folder, RESULT_KIND)
    exits = None
    if (folder / "exits.safetensors").exists():
        tensors, meta = io.load_tensors(folder / "exits.safetensors", EXIT_MODULES_KIND)
        exits = build_exit_modules(model, meta["kind"], list(meta["layers"]))
        exits.load_state_dict(tensors)
        exits.requires_grad_(False).eval()
    if config.backbone != "frozen":
        tensors, _ = io.load_tensors(folder / "model.safetensors", MODEL_WEIGHTS_KIND)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in tensors.items()}, strict=False)
    return model, exits, json.loads((folder / "result.json").read_text())


def train_exits(config: ExitTrainingConfig, progress: bool = True, retrain: bool = False, model=None, tokenizer=None
                ) -> tuple[Any, Any, ExitModules | None, dict[str, Any]]:
    """Train (or load the cached result of) ``config``: returns (model, tokenizer, exits, result).

    ``model``/``tokenizer`` default to ``load_model(config.model)``. A valid cached result is loaded in
    seconds; a corrupt one is refused and trained again; ``retrain`` ignores it. An interrupted run resumes
    from its checkpoint."""
    from effllm.models import load_model

    if model is None:
        model, tokenizer = load_model(config.model)
    compute_dtype = autocast_dtype(config, next(model.parameters()).device)
    folder = result_folder(config, compute_dtype)
    if not retrain and io.is_sealed(folder, RESULT_KIND):
        try:
            model, exits, result = _load(folder, config, model)
            return model, tokenizer, exits, result
        except (io.ArtifactError, KeyError, RuntimeError):
            pass
    checkpoints = folder.with_name(folder.name + ".checkpoint")
    model, exits, result = train(model, tokenizer, config, progress=progress, checkpoint_dir=checkpoints)
    _save(folder, config, model, exits, result)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return model, tokenizer, exits, result


def load_exit_trained(name: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                      recipe_name: str = "default", progress: bool = True):
    """``load_model("<model>-ee")``: the model with its exits trained by recipe ``recipe_name``, trained on first
    use (a progress bar; minutes on the embedded model) and loaded from the cache after. The exits are
    attached as ``records.EXITS`` (see the package docstring); returns ``(model, tokenizer)``. load_model reaches
    it through the ``-ee`` source of :mod:`effllm.models.sources`, which names it by its import path: rename
    it there too."""
    from effllm.models import resolve_dtype
    from effllm.models.sources import EXIT_TRAINED_SUFFIX, TASK_TRAINED_SUFFIX

    base = name.removesuffix(TASK_TRAINED_SUFFIX).removesuffix(EXIT_TRAINED_SUFFIX)
    model, tokenizer, exits, result = train_exits(recipe(recipe_name, model=base), progress=progress)
    dtype = resolve_dtype(dtype)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
        if exits is not None:
            exits = exits.to(device=device, dtype=dtype)  # the exit modules compute in the model's precision
    records.EXITS.set(model, exits)
    records.EXIT_TRAINING.set(model, result)
    return model.eval(), tokenizer


def load_task_trained(name: str, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                      progress: bool = True):
    """``load_model("<model>-ee-task")``: :func:`load_exit_trained` with the ``task`` recipe (exits trained on the
    built-in tasks' answers, prompt -> reference)."""
    return load_exit_trained(name, dtype, device, recipe_name="task", progress=progress)
