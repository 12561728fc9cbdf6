"""The decoding core: greedy decoding with a KV cache where every generated token may run its own layers.

    out = decode(model, input_ids, max_new_tokens=64, policy=Calm(threshold=0.9, candidate_layer=20))
    out.sequences       # [batch, prompt + new] as HF `generate` returns them (T5: decoder start + new)
    out.exit_layers     # [batch, new]: per new token, the 1-based layer whose state its prediction read
    out.num_layers_run  # [batch, new]: per new token, how many layers its prediction ran
    out.layers_run      # per new token, the 0-based layers its prediction ran

What every policy shares is written once here: argument checks, the prompt pass (the "encoder side" of a
decoder-only model, at the depth the policy gives the prompt), the T5 encoder, the end of sequence, padded
batches and the per-token bookkeeping. What differs lives in one *strategy* per policy family
(:mod:`effllm.decoding.early_exit` for full / static / CALM / FREE, :mod:`effllm.decoding.skipping`,
:mod:`effllm.decoding.speculative`): a step feeds the last token and returns one or more new tokens (several
for self-speculation), or asks to rewind (FREE's rollback).

The loop is written here rather than as a HF ``generate`` logits processor because it changes which layers
run per token, which HF's generation loop has no hook for. With exits disabled it reproduces HF ``generate``
token for token on every supported family (tests).

Batches: every policy decodes a batch, left-padded rows included (``attention_mask``), each row as it would
alone. :class:`~effllm.decoding.policies.Full` and :class:`~effllm.decoding.policies.StaticExit` natively (every
row runs the same layers); the per-token policies in lock step (:mod:`effllm.decoding.lockstep`: every layer
for every row, each row its own exits; a way to measure quality, not speed), or row by row where lock step
cannot (``lockstep.unsupported`` says why). A batch's output keeps each row's own output in ``rows``
(``split()``). A batch-1 prompt with padding has the padding removed first. Right padding on a decoder-only
batch is refused (pad on the left, as HF ``generate`` needs).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from effllm import checks
from effllm.adapters import get_adapter
from effllm.decoding import early_exit, lockstep, skipping, speculative
from effllm.decoding.exits import LOGIT_LENS, ExitTransform, resolve_exit_transform
from effllm.decoding.policies import Full, Policy
from effllm.decoding.state import DecodeState, Emitted, Strategy
from effllm.models import check_complete

__all__ = ["LOGIT_LENS", "DecodeOutput", "ExitTransform", "decode", "eos_ids", "resolve_exit_transform"]


@dataclass
class DecodeOutput:
    """What :func:`decode` returns. ``exit_layers`` is always an exit layer: the 1-based layer whose state the
    token's prediction read (L for full depth, self-speculation and the first token; layer skipping: the last
    layer that ran, the skipped ones above it passing the state on). ``num_layers_run`` is how many layers that
    prediction ran (early exit: the exit layer; layer skipping: fewer), which is what costs compare."""

    sequences: torch.LongTensor  # [batch, prompt + new]
    exit_layers: torch.LongTensor  # [batch, new]: the 1-based layer each new token's prediction read
    confidences: list[list[float]] = field(default_factory=list)  # per new token: confidence at each checked layer
    thresholds: list[float] = field(default_factory=list)  # per new token: the threshold in force (nan: none)
    confidence_flops: list[int] = field(default_factory=list)  # per new token: FLOPs spent on exit decisions
    confidence_seconds: list[float] = field(default_factory=list)  # per new token: time spent on them
    layers_run: list[tuple[int, ...]] = field(default_factory=list)  # per new token: 0-based layers it ran
    rollbacks: int = 0  # FREE: tokens revised by the deep model after a synchronized pass
    drafted: int = 0  # self-speculation: tokens drafted ...
    accepted: int = 0  # ... and accepted by the full-depth verification
    num_layers: int = 0  # the model's depth L
    policy: Policy | None = None
    prefill_seconds: float = 0.0  # the prompt pass and the first token (CUDA synchronised)
    decode_seconds: float = 0.0  # every later token
    num_layers_run: torch.LongTensor | None = None  # [batch, new]: layers each prediction ran (None: exit_layers)
    eos_token_ids: tuple[int, ...] = ()  # where each row's answer ends (empty: decoding ignored the end of sequence)
    rows: list[DecodeOutput] | None = None  # a batch decoded row by row or in lock step: each row's own output

    def __post_init__(self) -> None:
        if self.num_layers_run is None:
            self.num_layers_run = self.exit_layers

    def split(self, attention_mask: torch.Tensor | None = None) -> list[DecodeOutput]:
        """One batch-1 output per row, as decoding that row alone gives it: the prompt without its left padding
        (``attention_mask``: the batch's mask), the new tokens up to and including the row's first end of sequence,
        their exit layers and per-token records."""
        if self.rows is not None:
            return list(self.rows)
        new = self.new_tokens()
        prompt = self.sequences[:, : self.sequences.shape[1] - new.shape[1]]
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=new.device)
        out = []
        for r in range(self.sequences.shape[0]):
            length = _answer_length(new[r], eos)
            keep = prompt[r] if attention_mask is None or prompt.shape[1] != attention_mask.shape[1] else (
                prompt[r][attention_mask[r].bool().to(prompt.device)])
            out.append(DecodeOutput(
                sequences=torch.cat([keep, new[r, :length]]).unsqueeze(0),
                exit_layers=self.exit_layers[r : r + 1, :length],
                num_layers_run=self.num_layers_run[r : r + 1, :length],
                confidences=self.confidences[:length], thresholds=self.thresholds[:length],
                confidence_flops=self.confidence_flops[:length], confidence_seconds=self.confidence_seconds[:length],
                layers_run=self.layers_run[:length], num_layers=self.num_layers, policy=self.policy,
                prefill_seconds=self.prefill_seconds, decode_seconds=self.decode_seconds,
                eos_token_ids=self.eos_token_ids))
        return out

    @property
    def avg_layers(self) -> float:
        """Mean over new tokens of the number of layers they ran (``num_layers_run``; a batch with ``rows``: over
        every row's own tokens, up to its end of sequence)."""
        if self.rows is not None:
            return float(torch.cat([r.num_layers_run[0] for r in self.rows]).double().mean())
        return float(self.num_layers_run.double().mean())

    @property
    def layer_fraction(self) -> float:
        """Mean fraction of the L layers per new token."""
        return self.avg_layers / self.num_layers

    @property
    def acceptance_rate(self) -> float:
        """Self-speculation: accepted / drafted tokens (nan without drafts)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    def new_tokens(self, prompt_len: int | None = None) -> torch.LongTensor:
        """The generated ids [batch, new] (after the prompt; T5: after the decoder start token). ``prompt_len`` is
        deprecated and ignored: the output knows how many tokens are new."""
        if prompt_len is not None:
            warnings.warn("DecodeOutput.new_tokens(prompt_len) is deprecated: the argument is ignored; call "
                          "new_tokens()", DeprecationWarning, stacklevel=2)
        return self.sequences[:, self.sequences.shape[1] - self.exit_layers.shape[1]:]


def _answer_length(new: torch.Tensor, eos: torch.Tensor) -> int:
    """How many of one row's new ids [new] belong to its answer: up to and including the first end of sequence."""
    if not eos.numel():
        return int(new.shape[0])
    stops = torch.isin(new, eos).nonzero()
    return int(stops[0]) + 1 if len(stops) else int(new.shape[0])


def stack_rows(rows: list[DecodeOutput], prompt: torch.LongTensor, pad_token_id: int) -> DecodeOutput:
    """A batch's output from each row's own output (``prompt``: the batch's padded prompt [batch, P], or T5's
    decoder start column): the new tokens right-padded with ``pad_token_id`` (the end of sequence, as HF pads a
    finished row), exit layers and layer counts with 0 past a row's end; ``rows`` keeps every row's output."""
    news = [r.new_tokens()[0] for r in rows]
    width = max(n.shape[0] for n in news)
    new = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=prompt.device)
    exit_layers = torch.zeros((len(rows), width), dtype=torch.long, device=prompt.device)
    layers = torch.zeros_like(exit_layers)
    for i, (r, n) in enumerate(zip(rows, news, strict=True)):
        new[i, : n.shape[0]] = n
        exit_layers[i, : n.shape[0]] = r.exit_layers[0]
        layers[i, : n.shape[0]] = r.num_layers_run[0]
    first = rows[0]
    return DecodeOutput(
        sequences=torch.cat([prompt, new], dim=1), exit_layers=exit_layers, num_layers_run=layers,
        rollbacks=sum(r.rollbacks for r in rows), drafted=sum(r.drafted for r in rows),
        accepted=sum(r.accepted for r in rows), num_layers=first.num_layers, policy=first.policy,
        prefill_seconds=sum(r.prefill_seconds for r in rows), decode_seconds=sum(r.decode_seconds for r in rows),
        eos_token_ids=first.eos_token_ids, rows=rows)


def _lockstep_outputs(lockstep: Any, rows: list[Any], prompt: torch.LongTensor, prompt_mask: torch.Tensor | None,
            seconds: tuple[float, float]) -> list[DecodeOutput]:
    """Each row's output of a lock-step batch (:mod:`effllm.decoding.lockstep`), as decoding it alone returns it."""
    out = []
    eos = tuple(int(e) for e in lockstep.eos.tolist())
    for r, row in enumerate(rows):
        head = prompt[r] if prompt_mask is None else prompt[r][prompt_mask[r].bool()]
        records = row.records
        new = torch.cat([rec.token.reshape(1).to(prompt.device) for rec in records])
        out.append(DecodeOutput(
            sequences=torch.cat([head, new]).unsqueeze(0),
            exit_layers=torch.tensor([[rec.exit_layer for rec in records]], device=prompt.device),
            num_layers_run=torch.tensor([[len(rec.layers_run) for rec in records]], device=prompt.device),
            confidences=[rec.confidences for rec in records], thresholds=[rec.threshold for rec in records],
            confidence_flops=[rec.flops for rec in records], confidence_seconds=[rec.seconds for rec in records],
            layers_run=[rec.layers_run for rec in records], rollbacks=row.rollbacks, drafted=row.drafted,
            accepted=row.accepted, num_layers=lockstep.n_layers, policy=lockstep.policy,
            prefill_seconds=seconds[0], decode_seconds=seconds[1], eos_token_ids=eos))
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None = None,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """The end-of-sequence ids decoding stops at: ``eos_token_id``, else the model's generation config's."""
    return _eos_tensor(model, eos_token_id, torch.device(device))


def _eos_tensor(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return torch.tensor(ids, dtype=torch.long, device=device)


def _check_mask(attention_mask: Any, input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)} (1: token, "
                         f"0: padding); got {shape}")
    values = attention_mask.unique().tolist()
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token); got values {values}")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no token at all (every position is padding)")
    return attention_mask.to(dtype=torch.long, device=input_ids.device)


def _strategy(policy: Policy, adapter: Any, model: torch.nn.Module, exit_transform: ExitTransform | None,
              max_new_tokens: int) -> Strategy:
    if policy.method == "skip":
        return skipping.SkipStrategy(policy, adapter, model)
    if policy.method == "self-spec":
        return speculative.SelfSpecStrategy(policy, adapter, exit_transform)
    return early_exit.ExitStrategy(policy, adapter, exit_transform, max_new_tokens)


def _prepare_prompt(input_ids: torch.LongTensor, mask: torch.Tensor | None, encoder_decoder: bool
                    ) -> tuple[torch.LongTensor, torch.LongTensor | None, torch.Tensor | None]:
    """The prompt to decode from, the left-padding of each row and the padded batch's mask: a single padded row
    decodes as if alone (its padding dropped); a batch must be padded on the left."""
    if mask is None or encoder_decoder or bool(mask.all()):
        return input_ids, None, None
    if input_ids.shape[0] == 1:
        return input_ids[:, mask[0].bool()], None, None
    lengths = mask.sum(dim=1)
    left_padded = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) >= (mask.shape[1] - lengths).unsqueeze(1)
    if not torch.equal(mask.bool(), left_padded):
        raise ValueError("attention_mask pads on the right (or in the middle); decoder-only batches must be "
                         "padded on the left (tokenizer.padding_side = 'left'), as for HF generate")
    return input_ids, mask.shape[1] - lengths, mask


def _check_policy(model: torch.nn.Module, adapter: Any, policy: Policy | None, batch: int) -> Policy:
    policy = Full() if policy is None else policy
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be an effllm.decoding policy (Full, StaticExit, Calm, Free, Skip, SelfSpec); "
                         f"got {type(policy).__name__}")
    policy.check(adapter.num_layers, adapter.vocab_size)
    if policy.method == "skip" and getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("layer skipping decodes decoder-only models (llama family, opt, gpt2); got a T5 "
                         "encoder-decoder")
    return policy


def _prefill(strategy: Strategy, state: DecodeState, prompt: torch.LongTensor) -> Emitted:
    """The prompt pass at the depth the strategy gives the prompt, and the first new token."""
    adapter = state.adapter
    hidden = adapter.embed(prompt, position_ids=state.position_ids(0, prompt.shape[1]), cache=state.cache)
    context = state.context(hidden, 0)
    for i in strategy.prompt_layers:
        previous, hidden = hidden, adapter.run_layer(i, hidden, context)
        strategy.after_prompt_layer(i + 1, previous, hidden)
    state.position = prompt.shape[1]
    strategy.after_prompt(state, hidden)
    return strategy.first_token(state, hidden)


def _generate(strategy: Strategy, state: DecodeState, eos: torch.Tensor, finished: torch.Tensor) -> None:
    """Step until ``max_new_tokens`` or every row has ended. A strategy's step feeds ``state.next_token`` at
    ``state.position`` and advances ``state.position`` by the tokens it leaves in the cache; this loop keeps the
    records, the end of sequence and ``state.next_token``."""
    records = state.records
    while len(records) < state.max_new_tokens and not bool(finished.all()):
        result = strategy.step(state)
        if result.rewind is not None:
            del records[result.rewind:]
        for record in result.emitted:
            if len(records) >= state.max_new_tokens or bool(finished.all()):
                break
            # Finished rows keep emitting EOS (HF pads them with pad = eos for greedy search likewise).
            if eos.numel():
                record.token = torch.where(finished, eos[:1].expand_as(record.token), record.token)
            records.append(record)
            finished |= torch.isin(record.token, eos)
        state.next_token = records[-1].token
        state.generated = len(records)


def _output(records: list[Emitted], prompt: torch.LongTensor, strategy: Strategy, n_layers: int, policy: Policy,
            seconds: tuple[float, float], eos: torch.Tensor) -> DecodeOutput:
    batch = prompt.shape[0]
    new = torch.cat([r.token.to(prompt.device) for r in records], dim=1)
    return DecodeOutput(
        sequences=torch.cat([prompt, new], dim=1),
        exit_layers=torch.tensor([[r.exit_layer for r in records]] * batch, device=prompt.device),
        num_layers_run=torch.tensor([[len(r.layers_run) for r in records]] * batch, device=prompt.device),
        confidences=[r.confidences for r in records],
        thresholds=[r.threshold for r in records],
        confidence_flops=[r.flops for r in records],
        confidence_seconds=[r.seconds for r in records],
        layers_run=[r.layers_run for r in records],
        rollbacks=getattr(strategy, "rollbacks", 0),
        drafted=getattr(strategy, "drafted", 0),
        accepted=getattr(strategy, "accepted", 0),
        num_layers=n_layers,
        policy=policy,
        prefill_seconds=seconds[0],
        decode_seconds=seconds[1],
        eos_token_ids=tuple(int(e) for e in eos.tolist()),
    )


def _decode_each_row(model: torch.nn.Module, input_ids: torch.LongTensor, mask: torch.Tensor | None,
                     max_new_tokens: int, policy: Policy, keywords: dict[str, Any]) -> DecodeOutput:
    """A batch decoded one row at a time (each row's padding dropped): the reference the lock-step batch equals,
    and the path of the batches lock step does not decode (see :mod:`effllm.decoding.lockstep`)."""
    rows = []
    for r in range(input_ids.shape[0]):
        ids = input_ids[r : r + 1] if mask is None else input_ids[r : r + 1, mask[r].bool()]
        rows.append(decode(model, ids, max_new_tokens, policy, **keywords))
    eos = rows[0].eos_token_ids
    pad = eos[0] if eos else int(getattr(model.generation_config, "pad_token_id", None) or 0)
    prompt = input_ids if not getattr(model.config, "is_encoder_decoder", False) else torch.stack(
        [r.sequences[0, :1] for r in rows])
    return stack_rows(rows, prompt, pad)


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    policy: Policy | None = None,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    exit_transform: ExitTransform | str | None = None,
) -> DecodeOutput:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``input_ids`` [batch, prompt] with ``policy``
    (default :class:`Full`). Generation stops at ``eos_token_id`` (default: the model's; ``[]``: never).
    ``exit_transform(layer, h)`` maps an intermediate state before the final norm and head at an exit (a fitted
    or trained exit); None uses the model's attached exits if it has any, ``LOGIT_LENS`` the plain head.
    On T5, ``input_ids`` is the encoder input and ``sequences`` starts with the decoder start token."""
    check_complete(model, "decode")  # a model that pruning or slicing stopped on part-way gives no tokens
    adapter = get_adapter(model)
    input_ids = checks.token_ids("input_ids", input_ids, adapter.embed_tokens.weight.shape[0])
    checks.positive_int("max_new_tokens", max_new_tokens)
    batch = input_ids.shape[0]
    policy = _check_policy(model, adapter, policy, batch)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    mask = None if attention_mask is None else _check_mask(attention_mask, input_ids)
    if batch > 1 and not policy.batched and lockstep.unsupported(model, adapter, policy) is not None:
        return _decode_each_row(model, input_ids, mask, max_new_tokens, policy,
                                {"eos_token_id": eos_token_id, "exit_transform": exit_transform})
    original_prompt = input_ids  # the sequences start with it, padding included
    input_ids, offsets, prompt_mask = _prepare_prompt(input_ids, mask, encoder_decoder)
    transform = resolve_exit_transform(model, exit_transform)
    eos = _eos_tensor(model, eos_token_id, input_ids.device)
    extras: dict[str, Any] = {}
    prompt = input_ids
    if encoder_decoder:
        extras["encoder_hidden_states"] = adapter.encode(input_ids, attention_mask=mask)
        if mask is not None:
            extras["encoder_attention_mask"] = mask
        start = model.generation_config.decoder_start_token_id
        prompt = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
        original_prompt = prompt

    if batch > 1 and not policy.batched:  # a per-token policy on a batch: lock step, each row its own exits
        engine = lockstep.Lockstep(model, adapter, policy, transform, max_new_tokens, eos)
        rows, seconds = engine.run(prompt, offsets, prompt_mask, extras)
        pad = int(eos[0]) if eos.numel() else int(getattr(model.generation_config, "pad_token_id", None) or 0)
        return stack_rows(_lockstep_outputs(engine, rows, prompt, prompt_mask, seconds), original_prompt, pad)
    strategy = _strategy(policy, adapter, model, transform, max_new_tokens)
    device = input_ids.device
    _synchronize(device)
    started = time.perf_counter()
    cache = adapter.new_cache()
    strategy.prepare_cache(cache)
    state = DecodeState(adapter, cache, extras, next_token=prompt[:, -1:], position=0, max_new_tokens=max_new_tokens,
                        generated=0, offsets=offsets, prompt_mask=prompt_mask)
    first = _prefill(strategy, state, prompt)
    state.records.append(first)
    finished = torch.isin(first.token, eos)
    _synchronize(device)
    prefilled = time.perf_counter()
    state.next_token = first.token
    state.generated = 1
    _generate(strategy, state, eos, finished)
    _synchronize(device)
    return _output(state.records, original_prompt, strategy, adapter.num_layers, policy,
                   (prefilled - started, time.perf_counter() - prefilled), eos)
