"""Running the model layer by layer for exit training (gradients where wanted, optional layer skipping), and
the teacher pass: the untouched model's states and top-k distributions, cached once per data configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from effllm import io
from effllm.adapters import get_adapter
from effllm.decoding.exits import agreement_counts, exit_logits
from effllm.training import losses
from effllm.training.config import STATES_KIND, ExitTrainingConfig, data_key, training_dir
from effllm.training.data import (
    corpus_windows,
    pack,
    self_distillation_prompts,
    self_distillation_sequences,
    task_examples,
)

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
        # task examples pad their sources (seq2seq_examples): the encoder and the cross-attention skip the padding;
        # corpus windows hold no pad token (T5's pad id 0 never comes out of its tokenizer on text)
        padded = source == model.config.pad_token_id
        source_mask = (~padded).long() if bool(padded.any()) else None
        encoder = adapter.encode(source, attention_mask=source_mask)
        hidden = adapter.embed(decoder_input)
        extras = {} if source_mask is None else {"encoder_attention_mask": source_mask}
        context = adapter.context(hidden, encoder_hidden_states=encoder, **extras)
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
    train_topk_ids: torch.LongTensor  # [n, q', k] (q' = q, or the target half for T5; [1, t, k] for task examples
    # on the fast path: their t answer positions only, as one row; train_states likewise)
    train_topk_logprobs: torch.Tensor  # [n, q', k]
    heldout_argmax: torch.LongTensor  # [m, q'] the final layer's greedy token
    train_states: dict[int, torch.Tensor]  # layer -> [n, q', d] (the fast path's inputs)
    heldout_states: dict[int, torch.Tensor]  # layer -> [m, q', d]
    heldout_agreement: list[float]  # per layer 1..L: argmax of the logit lens == final argmax
    heldout_nll: float  # mean next-token negative log-likelihood of the last layer
    meta: dict[str, Any] = field(default_factory=dict)
    # task examples: the positions that count (their label is an answer token) [n, q'] / [m, q']; None: every one
    train_mask: torch.BoolTensor | None = None
    heldout_mask: torch.BoolTensor | None = None

    def counted(self, split: str) -> torch.BoolTensor:
        """The positions of ``split`` (``train`` / ``heldout``) that the loss and the agreement count."""
        mask = self.train_mask if split == "train" else self.heldout_mask
        shape = (self.train_topk_ids.shape[:2] if split == "train" else self.heldout_argmax.shape)
        return torch.ones(shape, dtype=torch.bool) if mask is None else mask


def build_windows(model, tokenizer, config: ExitTrainingConfig, progress: bool = True
                  ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Training windows and held-out windows (:func:`build_examples` without the masks)."""
    return build_examples(model, tokenizer, config, progress)[:2]


def build_examples(model, tokenizer, config: ExitTrainingConfig, progress: bool = True
                   ) -> tuple[torch.LongTensor, torch.LongTensor, torch.BoolTensor | None, torch.BoolTensor | None]:
    """(train, held-out, train mask, held-out mask): with ``config.task`` the task's answer examples (train and
    validation splits) and the masks of their answer positions; else corpus windows + packed self-distillation
    answers and held-out corpus windows, every position counted (masks None)."""
    if config.task is not None:  # decoder-only: prompt -> answer in one row; T5: source and target side by side
        train, train_mask = task_examples(model, tokenizer, config.task, config.task_examples, "train",
                                          config.task_max_len)
        heldout, heldout_mask = task_examples(model, tokenizer, config.task, config.heldout_task_examples,
                                              "validation", config.task_max_len)
        return train, heldout, train_mask, heldout_mask
    train = corpus_windows(tokenizer, config.corpora, config.windows_per_corpus, config.seq_len, config.seed)
    if config.self_distill_prompts and get_adapter(model).family != "t5":
        prompts = self_distillation_prompts(config.self_distill_prompts, config.seed)
        answers = self_distillation_sequences(model, tokenizer, prompts, config.answer_tokens, progress=progress)
        train = torch.cat([train, pack(answers, config.seq_len)])
    heldout = corpus_windows(tokenizer, config.corpora, config.heldout_windows_per_corpus, config.seq_len,
                             config.seed, split="validation")
    return train, heldout, None, None


@torch.no_grad()
def teacher_pass(model, tokenizer, config: ExitTrainingConfig, compute_dtype: torch.dtype, progress: bool = True,
                 batch_size: int = 4) -> TeacherData:
    """Run the untouched model over the training and held-out windows once; cached on disk (checksummed) by a
    hash of the data settings, so recipes that share their data share this pass."""
    layers = tuple(config.exit_layers) if config.fast_path else ()
    path = training_dir(config.model) / f"states-{data_key(config, compute_dtype, layers)}.safetensors"
    try:
        tensors, meta = io.load_tensors(path, STATES_KIND)
        return _teacher_from_tensors(tensors, meta)
    except (io.ArtifactError, KeyError):  # missing, corrupt or incomplete: compute it again
        pass
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    started, cpu_started = time.perf_counter(), time.process_time()
    train_ids, heldout_ids, train_mask, heldout_mask = build_examples(model, tokenizer, config, progress)
    n_layers = adapter.num_layers
    tensors: dict[str, torch.Tensor] = {"train_ids": train_ids, "heldout_ids": heldout_ids}
    compact = train_mask is not None and config.fast_path  # train rows stored as one row of answer positions
    if train_mask is not None:
        tensors.update(heldout_mask=heldout_mask)
        if not compact:
            tensors.update(train_mask=train_mask)
    topk_ids, topk_logprobs, train_states = [], [], {layer: [] for layer in layers}
    heldout_states = {layer: [] for layer in layers}
    batches = [("train", s) for s in range(0, len(train_ids), batch_size)]
    batches += [("heldout", s) for s in range(0, len(heldout_ids), batch_size)]
    agree = torch.zeros(n_layers, dtype=torch.long)
    nll, counted, argmaxes = 0.0, 0, []  # counted: positions with a label (and, for tasks, an answer token)
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        for part, start in tqdm(batches, desc="teacher pass", disable=not progress):
            ids = (train_ids if part == "train" else heldout_ids)[start:start + batch_size].to(device)
            states, labels = run_layers(model, ids)
            final = exit_logits(adapter, n_layers, states[-1]).float()  # [b, q', V]
            if part == "train":
                values, indices = torch.log_softmax(final, -1).topk(config.top_k, dim=-1)
                # compact: on the fast path the task examples keep their answer positions only (prompts are long,
                # answers short; the position-wise exits train on token rows anyway)
                keep = train_mask[start:start + batch_size].to(device) if compact else slice(None)
                topk_ids.append(indices[keep].int().cpu())
                topk_logprobs.append(values[keep].cpu())
                for layer in layers:
                    train_states[layer].append(states[layer][keep].float().cpu())
                continue
            target = final.argmax(-1)
            argmaxes.append(target.cpu())
            counted_here = (torch.ones_like(target, dtype=torch.bool) if heldout_mask is None
                            else heldout_mask[start:start + batch_size].to(device))
            for layer in range(1, n_layers + 1):  # the counted positions only, as one row
                agree[layer - 1] += agreement_counts(adapter, layer, states[layer][counted_here].unsqueeze(0),
                                                     target[counted_here].unsqueeze(0))[0]
            for layer in layers:
                heldout_states[layer].append(states[layer].float().cpu())
            mask = (labels.to(device) != losses.IGNORE_INDEX) & counted_here
            nll += float(torch.nn.functional.cross_entropy(final[mask], labels[mask].to(device), reduction="sum"))
            counted += int(mask.sum())
    tensors["train_topk_ids"] = torch.cat(topk_ids)
    tensors["train_topk_logprobs"] = torch.cat(topk_logprobs)
    if compact:  # [t, ...] -> [1, t, ...]: one "window" of every answer position, all of them counted
        tensors["train_topk_ids"] = tensors["train_topk_ids"].unsqueeze(0)
        tensors["train_topk_logprobs"] = tensors["train_topk_logprobs"].unsqueeze(0)
        train_states = {layer: [torch.cat(train_states[layer]).unsqueeze(0)] for layer in layers}
    tensors["heldout_argmax"] = torch.cat(argmaxes)
    n_counted = tensors["heldout_argmax"].numel() if heldout_mask is None else int(heldout_mask.sum())
    tensors["heldout_agreement"] = (agree.double() / max(n_counted, 1)).float()
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
        tensors["heldout_agreement"].tolist(), float(meta["heldout_nll"]), meta,
        tensors["train_mask"].bool() if "train_mask" in tensors else None,
        tensors["heldout_mask"].bool() if "heldout_mask" in tensors else None)


