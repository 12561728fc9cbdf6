"""The early-exit training losses of the seeds, on lists of per-layer states or logits.

Notation as in shared/PAPERS.md: L layers, layers numbered 1..L, CE_l the next-token cross-entropy of the
shared head on layer l's state (after the final norm).

- ``weighted_ce`` (CALM, and FREE's static / CALM baselines): sum_l l·CE_l / sum_l l.
- ``shallowdeep_kd_dyna`` (FREE, seed 001): (Ls·CE_Ls + L·CE_L) / (Ls + L) + distill_layer_alpha·KD, where
  KD is the mean squared error between the normed states of chosen deep ("teacher") layers and the shallow
  layers 1..Ls they are dynamically aligned to (FREE's ``compute_layerwise_distillation_loss``).
- LayerSkip's early-exit loss (Elhoushi et al. 2024): sum_l e~_l·CE_l with e(l) = e_scale·sum_{i<=l} i below
  the last layer, L - 1 + e_scale·sum_{i<L-1} i at it (0-based i), normalised over the layers its
  curriculum enables; with layer dropout rates p_l = p_max·(exp(l·ln 2 / (L-1)) - 1) (0-based l).
- ``distillation``: the cross-entropy of an exit's distribution against the original model's top-k
  probabilities (self-distillation; the teacher's mass outside its top k is left out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# FREE's hand-written teacher layers (0-based indices into the L normed layer outputs) for a deep model of
# `num_layers` layers and a shallow one of `shallow_exit_layer` layers (util/losses.py of seed 001).
FREE_TEACHER_LAYERS: dict[int, dict[int, list[int]]] = {
    24: {12: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23], 10: [2, 5, 7, 10, 12, 15, 17, 19, 21, 23],
         8: [2, 5, 8, 11, 14, 17, 20, 23], 6: [3, 7, 11, 15, 19, 23], 4: [5, 11, 17, 23]},
    12: {3: [3, 7, 11]},
}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [..., V] against ``labels`` [...] (-100 ignored), in float32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def weighted_ce(layer_logits: Sequence[torch.Tensor], labels: torch.Tensor,
                layers: Sequence[int] | None = None) -> torch.Tensor:
    """CALM's ``weighted_ce``: sum_l w_l·CE_l / sum_l w_l with w_l = l (1-based layer number).

    ``layer_logits[j]`` are the logits of layer ``layers[j]`` (default: 1, 2, ..., len(layer_logits))."""
    layers = list(range(1, len(layer_logits) + 1)) if layers is None else list(layers)
    if len(layers) != len(layer_logits) or not layers:
        raise ValueError(f"weighted_ce needs one layer number per logits tensor; got {len(layer_logits)} logits "
                         f"for layers {layers}")
    total = sum(layer * cross_entropy(logits, labels) for layer, logits in zip(layers, layer_logits, strict=True))
    return total / sum(layers)


def free_teacher_layers(num_layers: int, shallow_exit_layer: int) -> list[int]:
    """FREE's teacher layers as 0-based indices into the L layer outputs: the seed's table where it has the
    pair, else ``shallow_exit_layer`` layers spaced evenly and ending at the last, round(k·L/Ls) - 1 for
    k = 1..Ls (which reproduces every entry of the table whose L is a multiple of Ls)."""
    table = FREE_TEACHER_LAYERS.get(num_layers, {})
    if shallow_exit_layer in table:
        return list(table[shallow_exit_layer])
    return [round(k * num_layers / shallow_exit_layer) - 1 for k in range(1, shallow_exit_layer + 1)]


def layer_kd_dyna(normed_states: Sequence[torch.Tensor], shallow_exit_layer: int) -> torch.Tensor:
    """FREE's dynamic layer-wise distillation: MSE between each teacher layer's normed state (detached) and
    each shallow layer's; from the last teacher backwards, each teacher is aligned to the shallow layer of
    lowest MSE among those below the previous alignment; the loss is the mean MSE of the aligned pairs.

    ``normed_states``: the L layer outputs after the final norm, layer 1 first."""
    teachers = free_teacher_layers(len(normed_states), shallow_exit_layer)
    students = normed_states[:shallow_exit_layer]
    losses = torch.stack([torch.stack([F.mse_loss(s.float(), normed_states[t].detach().float()) for s in students])
                          for t in teachers])  # [n_teachers, Ls]
    alignment: list[int] = []
    last_aligned = len(normed_states)
    for row in reversed(range(len(teachers))):
        order = losses[row].detach().argsort()
        allowed = order[order < last_aligned]
        chosen = int(allowed[0]) if len(allowed) else last_aligned
        alignment.append(chosen)
        last_aligned = chosen
    alignment.reverse()
    # FREE indexes with the fall-back value too; with Ls shallow layers and Ls teachers it never falls back.
    index = torch.tensor([min(a, len(students) - 1) for a in alignment])
    return losses[torch.arange(len(teachers)), index].mean()


def shallowdeep_kd_dyna(shallow_logits: torch.Tensor, deep_logits: torch.Tensor, labels: torch.Tensor,
                        normed_states: Sequence[torch.Tensor], shallow_exit_layer: int,
                        distill_layer_alpha: float) -> torch.Tensor:
    """FREE's training loss: (Ls·CE_Ls + L·CE_L)/(Ls + L) + distill_layer_alpha·KD (see :func:`layer_kd_dyna`)."""
    num_layers = len(normed_states)
    ce = (shallow_exit_layer * cross_entropy(shallow_logits, labels) + num_layers * cross_entropy(deep_logits, labels))
    ce = ce / (shallow_exit_layer + num_layers)
    return ce + distill_layer_alpha * layer_kd_dyna(normed_states, shallow_exit_layer)


def layerskip_scales(num_layers: int, early_exit_scale: float, enabled: Sequence[bool] | None = None) -> list[float]:
    """LayerSkip's normalised early-exit loss weights e~_l for layers 1..L (``enabled``: the layers the
    curriculum turns on this step; the last layer always is)."""
    raw = [early_exit_scale * sum(range(i + 1)) for i in range(num_layers - 1)]
    raw.append(num_layers - 1 + early_exit_scale * sum(range(num_layers - 1)))
    if enabled is not None:
        raw = [r if (on or i == num_layers - 1) else 0.0 for i, (r, on) in enumerate(zip(raw, enabled, strict=True))]
    total = sum(raw)
    return [r / total for r in raw]


def rotational_curriculum(num_layers: int, step: int, rotation: int) -> list[bool]:
    """LayerSkip's rotational early-exit curriculum: at step t the layers l (0-based) with
    l mod R == t mod R are enabled (R = ``rotation``; R = 1 enables every layer)."""
    return [(i % rotation) == (step % rotation) for i in range(num_layers)]


def layer_dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """LayerSkip's per-layer dropout rates p_l = p_max·(exp(l·ln2/(L-1)) - 1), 0 for the first layer and
    p_max for the last (0-based l); also seed 003's stochastic skipping probabilities."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (math.exp(i * math.log(2) / (num_layers - 1)) - 1) for i in range(num_layers)]


def distillation(student_logits: torch.Tensor, teacher_ids: torch.LongTensor, teacher_logprobs: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the student's distribution against the teacher's top-k: -sum_k p_k log q(id_k),
    averaged over positions (where ``mask`` is true). ``student_logits`` [..., V'] must be over a
    vocabulary in which ``teacher_ids`` [..., k] index (the full one, or a candidate subset re-indexed).

    With k = V this is the KL divergence KL(p || q) plus the teacher's entropy, a constant."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = -(teacher_logprobs.float().exp() * logq.gather(-1, teacher_ids)).sum(-1)
    if mask is None:
        return per_position.mean()
    return (per_position * mask).sum() / mask.sum().clamp(min=1)
