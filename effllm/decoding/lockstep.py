"""Lock step: a batch of prompts decoded with a per-token policy (CALM, FREE, layer skipping, self-speculation),
each row keeping its own exits, so that quality tables need not decode one prompt at a time.

Batch 1 is how these policies save work: a token that exits at layer 12 runs 12 layers. In a batch the rows
want different layers, so lock step runs every layer for every row, every token, and gives each row the token,
exit layer and K/V that decoding it alone gives:

- an exit is decided per row (its own threshold, its own vocabulary-pruning schedule, :class:`ExitHead` per
  row; the full-vocabulary checks of many rows in one head product);
- ``kv="propagate"`` (CALM, layer skipping): an exited or skipping row's state passes through the layers above
  unchanged: each layer computes its K/V from that copied state (what ``append_kv`` computes alone) and its
  output is dropped for that row;
- ``deferred`` K/V (FREE, ``Calm(kv="deferred")``): alone, the skipped layers of a shallow token run later and
  give it the exact K/V of the full model; here they run now, which gives the same K/V;
- FREE's rollback: a row whose synchronized pass revises a shallow token drops its later positions from its
  own attention (their slots stay in the batch's cache, masked out for that row) and goes on from the revised
  token at its own positions; the other rows go on undisturbed;
- self-speculation's tokens are greedy full-depth decoding's; each row's drafts are the exit at the draft layer
  on the same states, so its rounds, drafted and accepted counts follow from the two predictions.

So lock step costs a full-depth batch per token (plus the exit checks): a way to measure *quality*, never
speed (time policies at batch 1). Its per-token seconds (``confidence_seconds``) split a batched product's time
evenly over its rows. A FREE policy's adaptive threshold is fitted once per batch (alone: once per sequence),
from what the batches before recorded. Batches lock step does not decode (:func:`unsupported`) decode row by
row (:func:`effllm.decoding.core.decode` does that itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from effllm.decoding.adaptive_threshold import AdaptiveThreshold
from effllm.decoding.exits import ExitHead, exit_logits, head_flops
from effllm.decoding.plans import budget_layer_count, plan_layers
from effllm.decoding.policies import Calm, Free, Policy, SelfSpec, Skip
from effllm.decoding.skipping import skip_controllers
from effllm.decoding.state import DecodeState, Emitted


def unsupported(model: torch.nn.Module, adapter: Any, policy: Policy) -> str | None:
    """Why lock step cannot decode ``policy`` on ``model`` (None: it can)."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    sliding = any(t == "sliding_attention" for t in (getattr(adapter, "layer_types", None) or ())) or bool(
        getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True))
    if isinstance(policy, Free) and policy.rollback_threshold is not None and (encoder_decoder or sliding):
        return ("FREE's rollback drops a row's later positions from its attention, which T5's relative positions "
                "and sliding windows do not see through")
    if isinstance(policy, Skip) and policy.kv_mode == "none" and policy.skip_mode in ("random", "controller"):
        return "layer skipping with kv='none' gives each layer its own cache length per row"
    if not isinstance(policy, Calm | Free | Skip | SelfSpec):
        return f"{type(policy).__name__} decodes batches natively"
    return None


@dataclass
class _Row:
    """One row's own decoding: its tokens, where they sit in the batch's cache, and its counters."""

    prompt_len: int  # logical positions of its prompt (padding excluded)
    records: list[Emitted] = field(default_factory=list)
    fed_slots: list[int] = field(default_factory=list)  # the cache slot of each fed record, in order
    finished: bool = False
    rollbacks: int = 0
    drafted: int = 0
    accepted: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)  # FREE: shallow tokens since the last deep one
    phase: tuple = ("start",)  # self-speculation: ("start",) | ("draft", j, g, n) | ("bonus", g, n)
    draft_rows: torch.Tensor | None = None  # self-speculation with a pruned vocabulary: the round's candidates

    @property
    def position(self) -> int:
        return self.prompt_len + len(self.fed_slots)


class Lockstep:
    """Decode one batch in lock step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, adapter: Any, policy: Policy, transform: Any, max_new_tokens: int,
                 eos: torch.Tensor):
        self.model, self.adapter, self.policy, self.transform = model, adapter, policy, transform
        self.n_layers = adapter.num_layers
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.calm, self.free = isinstance(policy, Calm), isinstance(policy, Free)
        self.skip, self.spec = isinstance(policy, Skip), isinstance(policy, SelfSpec)
        self.propagate = policy.kv_mode == "propagate"
        self.estimator = None
        self.checked: set[int] = set()
        if self.calm:
            self.checked = set(range(policy.candidate_layer, self.n_layers))
        elif self.free:
            self.checked = {policy.shallow_exit_layer} | ({policy.candidate_layer} if policy.vocab is not None else set())
            if policy.use_adapt_threshold:
                self.estimator = policy.adapt_threshold or AdaptiveThreshold(initial=policy.threshold)
                self.estimator.start_sequence()
        self.prompt_layers: list[int] = list(range(self.n_layers))
        if self.skip:
            self._init_skip(policy, model)

    # ---- set-up --------------------------------------------------------------------------------------------
    def _init_skip(self, policy: Skip, model: torch.nn.Module) -> None:
        self.fixed = plan_layers(policy, self.n_layers)
        self.controllers = skip_controllers(policy, model)
        self.n_random = budget_layer_count(self.n_layers, policy.budget) if policy.skip_mode == "random" else None
        if self.fixed is not None and policy.skip_prompt:
            self.prompt_layers = list(self.fixed)

    def _heads(self, batch: int) -> list[ExitHead]:
        policy = self.policy
        if self.calm:
            return [ExitHead(self.adapter, self.transform, policy.exit_conf_type, policy.meta_classifier, policy.vocab,
                             candidate_layer=policy.candidate_layer) for _ in range(batch)]
        if self.free:
            return [ExitHead(self.adapter, self.transform, "softmax", None, policy.vocab,
                             candidate_layer=policy.candidate_layer or 1) for _ in range(batch)]
        return []

    # ---- the batch -----------------------------------------------------------------------------------------
    def run(self, prompt: torch.LongTensor, offsets: torch.LongTensor | None, prompt_mask: torch.Tensor | None,
            extras: dict[str, Any]) -> tuple[list[_Row], tuple[float, float]]:
        """Decode the batch ``prompt`` [batch, P] (left-padded: ``offsets``, ``prompt_mask``); each row's records
        and the batch's (prefill, decode) seconds."""
        adapter, batch = self.adapter, prompt.shape[0]
        device = prompt.device
        started = time.perf_counter()
        cache = adapter.new_cache()
        self.heads = self._heads(batch)
        self.generators = [torch.Generator(device="cpu").manual_seed(self.policy.seed) for _ in range(batch)] \
            if self.skip else []
        state = DecodeState(adapter, cache, extras, next_token=prompt[:, -1:], position=0,
                            max_new_tokens=self.max_new_tokens, generated=0, offsets=offsets, prompt_mask=prompt_mask)
        valid = prompt_mask.bool() if prompt_mask is not None else torch.ones(prompt.shape, dtype=torch.bool,
                                                                              device=device)
        rows = [_Row(int(valid[r].sum())) for r in range(batch)]
        first = self._prefill(state, prompt)
        for r, record in enumerate(first):
            self._append(rows[r], record)
        prefilled = time.perf_counter()
        alive = list(range(batch))  # the rows the batch's tensors hold, in order (finished rows leave it)
        while True:
            done = [b for b, r in enumerate(alive) if rows[r].finished or len(rows[r].records) >= self.max_new_tokens]
            if len(done) == len(alive):
                break
            if done:
                alive, valid, extras = self._compact(alive, done, cache, valid, extras)
            here = [rows[r] for r in alive]
            n = len(alive)
            tokens = torch.stack([row.records[-1].token.reshape(1).to(device) for row in here])  # [n, 1]
            positions = torch.tensor([[row.position] for row in here], device=device)
            hidden = adapter.embed(tokens, position_ids=positions, cache=cache)
            mask = None if bool(valid.all()) else torch.cat([valid, valid.new_ones(n, 1)], dim=1).long()
            context = adapter.context(hidden, position_ids=positions, cache=cache, attention_mask=mask, **extras)
            slot = valid.shape[1]
            valid = torch.cat([valid, valid.new_ones(n, 1)], dim=1)
            for row in here:
                row.fed_slots.append(slot)
            results = self._step(hidden, context, list(range(n)), here)
            for b in range(n):
                valid = self._apply(here[b], b, results[b], valid)
        return rows, (prefilled - started, time.perf_counter() - prefilled)

    def _compact(self, alive: list[int], done: list[int], cache: Any, valid: torch.Tensor, extras: dict[str, Any]
                 ) -> tuple[list[int], torch.Tensor, dict[str, Any]]:
        """Drop the finished rows from the batch (its cache, masks, encoder states and per-row heads), so that a
        batch whose rows end at different lengths does not keep computing the ended ones."""
        keep = [b for b in range(len(alive)) if b not in set(done)]
        index = torch.tensor(keep, device=valid.device)
        for part in (getattr(cache, "self_attention_cache", cache), getattr(cache, "cross_attention_cache", None)):
            for layer in getattr(part, "layers", ()):
                layer.batch_select_indices(index.to(layer.keys.device) if getattr(layer, "keys", None) is not None
                                           else index)
        extras = {k: v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) else v
                  for k, v in extras.items()}
        if self.heads:
            self.heads = [self.heads[b] for b in keep]
        if self.generators:
            self.generators = [self.generators[b] for b in keep]
        return [alive[b] for b in keep], valid[index], extras

    def _append(self, row: _Row, record: Emitted) -> None:
        if row.finished or len(row.records) >= self.max_new_tokens:
            return
        row.records.append(record)
        if self.eos.numel() and bool(torch.isin(record.token.reshape(-1).to(self.eos.device), self.eos).any()):
            row.finished = True
            if self.spec and row.phase[0] != "start":  # the round the end of sequence cut short
                g, n = row.phase[-2:]  # ("draft", j, g, n) or ("bonus", g, n): the round's drafts and matches
                row.drafted, row.accepted = row.drafted + g, row.accepted + n
                row.phase = ("start",)

    def _apply(self, row: _Row, r: int, result: tuple[Emitted, int | None], valid: torch.Tensor) -> torch.Tensor:
        """Append a row's new record, or rewind it first (FREE's rollback: ``result[1]`` is the index revised)."""
        record, rewind = result
        if rewind is not None:
            dropped = row.fed_slots[rewind:]
            valid = valid.clone()
            valid[r, dropped] = False
            del row.fed_slots[rewind:]
            del row.records[rewind:]
        self._append(row, record)
        return valid

    # ---- the prompt and the first token ---------------------------------------------------------------------
    def _prefill(self, state: DecodeState, prompt: torch.LongTensor) -> list[Emitted]:
        adapter = self.adapter
        hidden = adapter.embed(prompt, position_ids=state.position_ids(0, prompt.shape[1]), cache=state.cache)
        context = state.context(hidden, 0)
        checks = []  # CALM checks token 0 too (deploying_t5.py:926): the last prompt position at each checked layer
        for i in self.prompt_layers:
            previous, hidden = hidden, adapter.run_layer(i, hidden, context)
            if self.calm and i + 1 in self.checked:
                checks.append((i + 1, previous[:, -1:], hidden[:, -1:]))
        batch = prompt.shape[0]
        final = exit_logits(adapter, self.n_layers, hidden[:, -1:]).argmax(-1)  # [batch, 1]
        read = self.prompt_layers[-1] + 1 if self.prompt_layers else 0
        if not self.calm or not checks:
            return [Emitted(final[r : r + 1], read, tuple(self.prompt_layers)) for r in range(batch)]
        threshold = self.policy.threshold_at(1, self.max_new_tokens)  # token 0 uses position 1
        for head in self.heads:
            head.new_token()
        out: dict[int, Emitted] = {}
        confidences: dict[int, list[float]] = {r: [] for r in range(batch)}
        for layer, previous, current in checks:
            open_rows = [r for r in range(batch) if r not in out]
            for r, (confidence, candidate) in self._check(layer, current, previous, open_rows).items():
                confidences[r].append(confidence)
                if confidence > threshold:
                    token = candidate if candidate is not None else self.heads[r].final(layer, current[r : r + 1])
                    out[r] = self._emitted(r, token, layer, confidences[r], threshold)
        for r in range(batch):
            if r not in out:
                out[r] = self._emitted(r, final[r : r + 1], self.n_layers, confidences[r], threshold)
        return [out[r] for r in range(batch)]

    def _emitted(self, r: int, token: torch.Tensor, layer: int, confidences: list[float], threshold: float) -> Emitted:
        head = self.heads[r]
        return Emitted(token.reshape(1, 1), layer, tuple(range(layer)), list(confidences), threshold, head.flops,
                       head.seconds)

    # ---- one token for every row ------------------------------------------------------------------------------
    def _check(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor, rows: list[int]
               ) -> dict[int, tuple[float, torch.Tensor | None]]:
        """Each row's exit confidence (and token) at ``layer``: full-vocabulary softmax checks of many rows in one
        head product, pruned-vocabulary, saturation and meta checks row by row."""
        out: dict[int, tuple[float, torch.Tensor | None]] = {}
        heads = self.heads
        batched = [r for r in rows if heads[r].conf_type == "softmax" and heads[r].rows is None]
        if batched:
            start = time.perf_counter()
            logits = heads[batched[0]].logits(layer, hidden[batched, -1:])  # [n, 1, V]
            share = (time.perf_counter() - start) / len(batched)
            for j, r in enumerate(batched):
                begin = time.perf_counter()
                out[r] = heads[r].score(layer, logits[j, -1])
                heads[r].seconds += share + time.perf_counter() - begin
        for r in rows:
            if r not in out:
                out[r] = heads[r].confidence(layer, hidden[r : r + 1], previous[r : r + 1])
        return out

    def _step(self, hidden: torch.Tensor, context: Any, active: list[int], rows: list[_Row]
              ) -> dict[int, tuple[Emitted, int | None]]:
        if self.skip:
            return self._skip_step(hidden, context, active)
        if self.spec:
            return self._spec_step(hidden, context, active, rows)
        return self._exit_step(hidden, context, active, rows)

    def _threshold(self, row: _Row) -> float:
        if self.free:
            return self.estimator.threshold if self.estimator is not None else self.policy.threshold
        return self.policy.threshold_at(len(row.records) + 1, self.max_new_tokens)  # generated k: position k + 1

    def _exit_step(self, hidden: torch.Tensor, context: Any, active: list[int], rows: list[_Row]
                   ) -> dict[int, tuple[Emitted, int | None]]:
        """CALM and FREE: every layer for every row; each row exits (or not) at its own checks."""
        adapter, policy = self.adapter, self.policy
        for r in active:
            self.heads[r].new_token()
        thresholds = {r: self._threshold(rows[r]) for r in active}
        confidences: dict[int, list[float]] = {r: [] for r in active}
        exited: dict[int, tuple[torch.Tensor, int]] = {}
        shallow: dict[int, torch.Tensor | None] = {}
        frozen = torch.zeros(hidden.shape[0], 1, 1, dtype=torch.bool, device=hidden.device)
        for i in range(self.n_layers):
            previous = hidden
            hidden = adapter.run_layer(i, hidden, context)
            if self.propagate and exited:  # exited rows: K/V from the copied exit state, the state kept
                hidden = torch.where(frozen.to(hidden.device), previous.to(hidden.device), hidden)
            layer = i + 1
            if layer not in self.checked or layer == self.n_layers:
                continue
            open_rows = [r for r in active if r not in exited]
            for r, (confidence, candidate) in self._check(layer, hidden, previous, open_rows).items():
                if self.free and layer != policy.shallow_exit_layer:
                    continue  # FREE with vocabulary pruning: this check only picks the candidates
                confidences[r].append(confidence)
                if self.free:
                    shallow[r] = candidate
                if confidence > thresholds[r]:
                    token = candidate if candidate is not None else self.heads[r].final(layer, hidden[r : r + 1])
                    exited[r] = (token, layer)
                    frozen[r] = True
        calibrate = self.free and (self.estimator is not None or policy.rollback_threshold is not None)
        deep_rows = [r for r in active if r not in exited or calibrate]
        deep = {}
        if deep_rows:
            logits = exit_logits(adapter, self.n_layers, hidden[deep_rows, -1:])[:, -1]  # [n, V]
            deep = {r: logits[j] for j, r in enumerate(deep_rows)}
        out = {}
        for r in active:
            if r in exited:
                token, layer = exited[r]
                record = self._emitted(r, token, layer, confidences[r], thresholds[r])
                if calibrate:
                    log_probs = torch.log_softmax(deep[r].float(), dim=-1)
                    rows[r].pending.append({"index": len(rows[r].records), "confidence": confidences[r][-1],
                                            "agreed": int(token) == int(log_probs.argmax()),
                                            "deep": int(log_probs.argmax()),
                                            "cross_entropy": -float(log_probs[int(token)])})
                out[r] = (record, None)
                continue
            token = deep[r].argmax().view(1, 1)
            record = self._emitted(r, token, self.n_layers, confidences[r],
                                   thresholds[r] if self.checked else math.nan)
            out[r] = self._synchronized(rows[r], record, shallow.get(r)) if self.free else (record, None)
        return out

    def _synchronized(self, row: _Row, record: Emitted, shallow_token: torch.Tensor | None
                      ) -> tuple[Emitted, int | None]:
        """A deep FREE token after shallow ones: the adaptive threshold records them, and rollback revises the
        first whose deep cross-entropy exceeds the threshold (``deploying_t5.py:898-906``; see early_exit)."""
        pending, row.pending = row.pending, []
        if not pending:
            return record, None
        if self.estimator is not None:
            agreed = [p["agreed"] for p in pending] + [
                shallow_token is not None and int(shallow_token) == int(record.token)]
            self.estimator.record([p["confidence"] for p in pending] + [record.confidences[-1]], agreed)
        threshold = self.policy.rollback_threshold
        if threshold is None:
            return record, None
        for p in pending:
            if p["cross_entropy"] > threshold:
                index = p["index"]
                old = row.records[index]
                row.rollbacks += len(row.records) + 1 - index  # the revised token, what followed, this step's
                revised = Emitted(torch.tensor([[p["deep"]]], device=record.token.device), self.n_layers,
                                  tuple(range(self.n_layers)), old.confidences, old.threshold, old.flops, old.seconds)
                return revised, index
        return record, None

    def _skip_step(self, hidden: torch.Tensor, context: Any, active: list[int]
                   ) -> dict[int, tuple[Emitted, int | None]]:
        """Layer skipping: each row runs its own layers; a skipping row's state passes the layer unchanged (its
        K/V from that state: ``kv="propagate"``)."""
        adapter, batch = self.adapter, hidden.shape[0]
        planned: list[list[int] | None]
        if self.fixed is not None:
            planned = [list(self.fixed)] * batch
        elif self.controllers is None:  # a random route per row and token, each row its own generator
            planned = [sorted(torch.randperm(self.n_layers, generator=self.generators[r])[: self.n_random].tolist())
                       if r in active else [] for r in range(batch)]
        else:
            planned = [None] * batch
        ran: list[list[int]] = [[] for _ in range(batch)]
        for i in range(self.n_layers):
            if planned[0] is not None or self.controllers is None:
                runs = [i in (planned[r] or ()) for r in range(batch)]
            else:
                runs = [r in active and bool(self.controllers.keep(i, hidden[r : r + 1, -1], self.generators[r]).item()
                                             > 0.5) for r in range(batch)]
            if not any(runs) and not self.propagate:
                continue  # nobody runs it and nothing is owed to it (fixed patterns)
            out = adapter.run_layer(i, hidden, context)
            if all(runs):
                hidden = out  # (a sliced model's layer may change the width: every row runs it)
            elif out.shape[-1] != hidden.shape[-1]:
                raise ValueError(f"layer {i} changes the state's width ({hidden.shape[-1]} -> {out.shape[-1]}: a "
                                 f"sliced model), so a row cannot skip it; skip only layers that keep the width")
            else:
                keep = torch.tensor(runs, device=out.device).view(batch, 1, 1)
                hidden = torch.where(keep, out, hidden.to(out.device))
            for r in range(batch):
                if runs[r]:
                    ran[r].append(i)
        tokens = exit_logits(adapter, self.n_layers, hidden[:, -1:]).argmax(-1)  # [batch, 1]
        return {r: (Emitted(tokens[r : r + 1], max(ran[r]) + 1 if ran[r] else 0, tuple(ran[r])), None)
                for r in active}

    def _spec_step(self, hidden: torch.Tensor, context: Any, active: list[int], rows: list[_Row]
                   ) -> dict[int, tuple[Emitted, int | None]]:
        """Self-speculation: the full-depth token, and each row's draft at E on the same states (see the module
        docstring): a round of g drafts accepts its matching prefix, then the full model's token."""
        adapter, policy = self.adapter, self.policy
        exit_layer = policy.draft_exit_layer
        at_exit = hidden
        for i in range(self.n_layers):
            hidden = adapter.run_layer(i, hidden, context)
            if i + 1 == exit_layer:
                at_exit = hidden
        tokens = exit_logits(adapter, self.n_layers, hidden[:, -1:]).argmax(-1)  # [batch, 1]
        every = tuple(range(self.n_layers))
        out = {}
        for r in active:
            row, token = rows[r], tokens[r : r + 1]
            record = Emitted(token, self.n_layers, every)
            self._advance_round(row, record, at_exit[r : r + 1, -1:], int(token))
            out[r] = (record, None)
        return out

    def _draft(self, row: _Row, state: torch.Tensor, first: bool) -> tuple[int, int]:
        """The draft token at E from ``state`` [1, 1, d] and the head rows it scored."""
        rows = None if first else row.draft_rows
        logits = exit_logits(self.adapter, self.policy.draft_exit_layer, state, self.transform, rows)[0, -1]
        local = int(logits.argmax())
        if first and self.policy.vocab is not None:
            row.draft_rows = logits.topk(min(self.policy.vocab.k, logits.shape[-1])).indices
        return (local if rows is None else int(rows[local])), logits.shape[-1]

    def _advance_round(self, row: _Row, record: Emitted, state: torch.Tensor, token: int) -> None:
        phase = row.phase
        if phase[0] == "bonus":  # every draft matched: this token is the verification's own
            row.drafted, row.accepted, row.phase = row.drafted + phase[1], row.accepted + phase[2], ("start",)
            return
        if phase[0] == "start":
            g = min(self.policy.num_draft_tokens, self.max_new_tokens - len(row.records) - 1)
            if g <= 0:
                return
            start = time.perf_counter()
            draft, scored = self._draft(row, state, first=True)
            # the round's drafting cost, once, on its first token: the first draft's full head, the others' rows
            rest = scored if self.policy.vocab is None else min(self.policy.vocab.k, scored)
            record.flops = head_flops(self.adapter.hidden_size, scored) + (g - 1) * head_flops(self.adapter.hidden_size,
                                                                                                rest)
            record.seconds = time.perf_counter() - start
            j, n = 0, 0
        else:
            _, j, g, n = phase
            draft, _ = self._draft(row, state, first=False)
        if draft != token:  # the first disagreement: this token is the verification's correction
            row.drafted, row.accepted, row.phase = row.drafted + g, row.accepted + n, ("start",)
            return
        j, n = j + 1, n + 1
        row.phase = ("bonus", g, n) if j == g else ("draft", j, g, n)
