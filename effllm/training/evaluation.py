"""Evaluation of trained exits: top-1 agreement of each exit with the untouched last layer (from the cached
states or a full pass) and the last layer's held-out perplexity."""

from __future__ import annotations

import torch

from effllm.adapters import get_adapter
from effllm.decoding.exits import agreement_counts, exit_logits
from effllm.training import losses
from effllm.training.modules import ExitModules
from effllm.training.teacher import TeacherData, run_layers

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
    counted = teacher.counted(split)[:windows]  # task examples: the answer positions only
    result = {}
    for layer in layers:
        hits = 0
        for start in range(0, len(target), 4):  # 4 windows at a time: whole windows suit every exit kind
            hidden = exits(layer, states[layer][start:min(start + 4, len(target))].to(device)).to(dtype)
            keep = counted[start:start + 4].to(device)
            hits += agreement_counts(adapter, layer, hidden[keep], target[start:start + 4].to(device)[keep])[0]
        result[layer] = hits / max(int(counted.sum()), 1)
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
        keep = teacher.counted("heldout")[offset:offset + len(ids)].to(device)  # tasks: the answer positions
        offset += len(ids)
        for layer in range(1, n_layers + 1):
            if teacher.heldout_mask is None:  # whole windows (an attention exit needs them)
                agree[layer - 1] += agreement_counts(adapter, layer, states[layer], target, exits)[0]
            else:  # task examples: the answer positions, through position-wise exits (task training's only kind)
                agree[layer - 1] += agreement_counts(adapter, layer, states[layer][keep].unsqueeze(0),
                                                     target[keep].unsqueeze(0), exits)[0]
        final = exit_logits(adapter, n_layers, states[-1]).float()
        mask = (labels != losses.IGNORE_INDEX) & keep
        nll += float(torch.nn.functional.cross_entropy(final[mask], labels[mask], reduction="sum"))
        counted += int(mask.sum())
    return (agree.double() / max(int(teacher.counted("heldout").sum()), 1)).tolist(), nll / max(counted, 1)


