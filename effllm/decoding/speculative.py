"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2023): the
model's own first layers draft, its full depth verifies, and the output is greedy full-depth decoding's.

One round, with E = ``draft_exit_layer``, g drafts and the newest token x0 at position p:

    draft   feed x0, d0, ..., d_{g-2} one at a time through layers 1..E (their K/V stay in those layers'
            cache) and read d0, ..., d_{g-1} off the exit head at E
    verify  run layers 1..E on d_{g-1}, then layers E+1..L on the g + 1 states at positions p..p+g in one
            causal pass: the full model's greedy token after x0, d0, ..., d_{g-1}
    accept  the longest prefix d0..d_{n-1} that equals the full model's tokens, then the full model's token
            at the first disagreement (or after the last draft): n + 1 tokens per round; every cached
            position past p + n is dropped

The drafts' K/V in layers 1..E are exactly what the full model computes there (same tokens, same layers),
so they are reused, not recomputed. With ``vocab`` (fixed k), the first draft of a round scores the full
vocabulary at E and the round's later drafts only its top-k candidates (Vincenti et al.'s pruning, applied
along the drafted tokens: one full head product per round instead of one per draft).
"""

from __future__ import annotations

import time

import torch

from effllm.decoding.early_exit import allow_crop, crop_cache
from effllm.decoding.exits import exit_logits, head_flops
from effllm.decoding.policies import SelfSpec
from effllm.decoding.state import DecodeState, Emitted, StepResult, Strategy


class SelfSpecStrategy(Strategy):
    def __init__(self, policy: SelfSpec, adapter, exit_transform):
        if policy.vocab is not None and policy.vocab.type_vocab_reduct != "fixed":
            raise ValueError(f"self-speculation prunes the draft vocabulary with type_vocab_reduct='fixed' (the "
                             f"candidates of a round's first draft); got {policy.vocab.type_vocab_reduct!r}")
        self.policy, self.adapter = policy, adapter
        self.exit_transform = exit_transform
        self.n_layers = adapter.num_layers
        self.prompt_layers = range(self.n_layers)
        self.drafted = self.accepted = 0
        self.rounds: list[tuple[int, int]] = []  # (drafted, accepted) per verification

    def prepare_cache(self, cache) -> None:
        allow_crop(cache)

    def first_token(self, state: DecodeState, hidden: torch.Tensor) -> Emitted:
        token = exit_logits(self.adapter, self.n_layers, hidden[:, -1:]).argmax(-1).to(state.next_token.device)
        return Emitted(token, self.n_layers, tuple(range(self.n_layers)))


    def step(self, state: DecodeState) -> StepResult:
        adapter, exit_layer = self.adapter, self.policy.draft_exit_layer
        p = state.position
        remaining = state.max_new_tokens - state.generated
        drafts_wanted = min(self.policy.num_draft_tokens, remaining - 1)  # a round emits drafts + 1 tokens
        start = time.perf_counter()
        flops = 0
        states, drafts = [], []
        rows = None
        token = state.next_token
        for j in range(drafts_wanted):
            hidden = adapter.embed(token, position_ids=state.position_ids(p + j, 1), cache=state.cache)
            context = state.context(hidden, p + j)
            for i in range(exit_layer):
                hidden = adapter.run_layer(i, hidden, context)
            states.append(hidden)
            logits = exit_logits(adapter, exit_layer, hidden, self.exit_transform, rows)[0, -1]  # [V] or [k]
            flops += head_flops(adapter.hidden_size, logits.shape[-1])
            local = logits.argmax()
            token = (local if rows is None else rows[local]).view(1, 1).to(state.next_token.device)
            if self.policy.vocab is not None and rows is None:
                rows = logits.topk(min(self.policy.vocab.k, logits.shape[-1])).indices
            drafts.append(token)
        draft_seconds = time.perf_counter() - start
        # Verify: layers 1..E for the token not fed yet (x0 when nothing was drafted, else the last draft) ...
        last = drafts[-1] if drafts else state.next_token
        hidden = adapter.embed(last, position_ids=state.position_ids(p + len(drafts), 1), cache=state.cache)
        context = state.context(hidden, p + len(drafts))
        lower = exit_layer if drafts else 0
        for i in range(lower):
            hidden = adapter.run_layer(i, hidden, context)
        # ... then the upper layers (all layers without drafts) on every position of the round in one pass.
        hidden = torch.cat([*states, hidden], dim=1)  # [1, g + 1, d]
        context = state.context(hidden, p)
        for i in range(lower, self.n_layers):
            hidden = adapter.run_layer(i, hidden, context)
        verified = exit_logits(adapter, self.n_layers, hidden).argmax(-1)[0].to(state.next_token.device)  # [g + 1]
        n = 0
        while n < len(drafts) and int(drafts[n]) == int(verified[n]):
            n += 1
        self.drafted += len(drafts)
        self.accepted += n
        self.rounds.append((len(drafts), n))
        crop_cache(state.cache, p + n + 1)  # x0, d0..d_{n-1} stay; rejected drafts leave every layer
        state.position = p + n + 1
        tokens = [*drafts[:n], verified[n].view(1, 1)]
        every = tuple(range(self.n_layers))
        emitted = [Emitted(t, self.n_layers, every) for t in tokens]
        emitted[0].flops, emitted[0].seconds = flops, draft_seconds  # the round's drafting cost, once
        return StepResult(emitted)


def expected_speedup(acceptance: float, draft_length: int, draft_layer: int, n_layers: int,
                     verify_cost: float = 1.0) -> float:
    """Self-speculation's speed-up over full-depth decoding if each draft is accepted with probability
    ``acceptance``, independently (Leviathan et al. 2023): a round of g = ``draft_length`` drafts at layer E =
    ``draft_layer`` of L emits (1 - a^(g+1)) / (1 - a) tokens and costs g E / L + E / L + (L - E) / L x
    ``verify_cost`` full tokens (g + 1 draft-depth passes, then the deep layers once over g + 1 tokens, which cost
    ``verify_cost`` times one token's: 1 where verifying is as cheap as decoding one token, more where it is not).
    With ``verify_cost`` 1 it is an upper bound for this round structure at that acceptance."""
    from effllm import checks

    checks.fraction("acceptance", acceptance)
    checks.positive_int("draft_length", draft_length)
    checks.layer("draft_layer", draft_layer, n_layers, high=n_layers - 1)
    if not verify_cost > 0:
        raise ValueError(f"verify_cost must be > 0 (the deep layers' cost over g + 1 tokens in one-token units); "
                         f"got {verify_cost!r}")
    g, a = draft_length, acceptance
    tokens = g + 1 if a == 1 else (1 - a ** (g + 1)) / (1 - a)
    return tokens / _round_cost(draft_length, draft_layer, n_layers, verify_cost)


def _round_cost(draft_length: int, draft_layer: int, n_layers: int, verify_cost: float) -> float:
    """One round's cost in full-depth tokens: g + 1 passes through layers 1..E, the deep layers once."""
    return (draft_length + 1) * draft_layer / n_layers + (n_layers - draft_layer) / n_layers * verify_cost


def speedup_at_acceptance_rate(rate: float, draft_length: int, draft_layer: int, n_layers: int,
                               verify_cost: float = 1.0) -> float:
    """The same bound from the acceptance rate the decoder reports (``DecodeOutput.accepted / drafted``: accepted
    prefixes over every drafted token). A round of g drafts emits its accepted prefix plus one token, so it emits
    1 + rate x g tokens on average, whatever the acceptances' dependence (no independence assumed; the per-draft
    probability of :func:`expected_speedup` is higher than this rate, which also counts the drafts after a
    rejection). Costs as there; with ``verify_cost`` 1 an upper bound for the measured speed."""
    from effllm import checks

    checks.fraction("rate", rate)
    checks.positive_int("draft_length", draft_length)
    checks.layer("draft_layer", draft_layer, n_layers, high=n_layers - 1)
    if not verify_cost > 0:
        raise ValueError(f"verify_cost must be > 0; got {verify_cost!r}")
    return (1 + rate * draft_length) / _round_cost(draft_length, draft_layer, n_layers, verify_cost)
