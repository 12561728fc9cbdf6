"""Quality in batches (issue 25): every policy decodes a left-padded batch, each row exiting on its own, and in
float32 row i's tokens, exit layers and counters equal decoding row i alone, on every model family.

Thresholds are set at the median confidence each model shows at its checked layers, so that about half the
tokens exit early and the rows of a batch disagree about where to exit (a threshold nobody passes would make
every row full depth and test nothing); FREE's rollback threshold is set so that rollbacks happen."""

from __future__ import annotations

import pytest
import torch

from effllm.adapters import get_adapter
from effllm.decoding import Calm, Free, SelfSpec, Skip, VocabPruning, decode, lockstep
from effllm.decoding.batched import decode_rows, pad_left
from effllm.models import TINY_FAMILIES, tiny_model

FAMILIES = sorted(TINY_FAMILIES)
SEQ2SEQ = {f for f in FAMILIES if TINY_FAMILIES[f][0] == "t5"}
NEW = 10


def _prompts(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (1, length), generator=generator) for length in (5, 9, 7, 12, 6, 10, 8, 11)[:n]]


def _median_confidence(model, prompts, policy) -> float:
    """The median confidence ``policy`` (with a threshold nobody passes) sees at its checked layers."""
    values = []
    for ids in prompts:
        out = decode(model, ids, NEW, policy, eos_token_id=[])
        values.extend(c for per_token in out.confidences for c in per_token)
    # the middle of the widest gap between observed confidences around the median: no token sits near the
    # threshold, so batched and single-row arithmetic (equal to ~1e-7) cannot decide an exit differently
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    low, high = len(ordered) // 4, max(len(ordered) // 4 + 1, 3 * len(ordered) // 4)
    gaps = ordered[low + 1 : high + 1] - ordered[low:high]
    j = low + int(gaps.argmax())
    return float((ordered[j] + ordered[j + 1]) / 2)


def _policies(model, family: str, prompts) -> dict[str, object]:
    n = get_adapter(model).num_layers
    calm_soft = _median_confidence(model, prompts, Calm(threshold=1.0, candidate_layer=1))
    calm_state = _median_confidence(model, prompts, Calm(threshold=1.0, candidate_layer=1, exit_conf_type="state"))
    free = _median_confidence(model, prompts, Free(shallow_exit_layer=n // 2, threshold=1.0))
    policies = {
        "calm propagate": Calm(threshold=calm_soft, candidate_layer=1),
        "calm deferred": Calm(threshold=calm_soft, candidate_layer=1, kv="deferred"),
        "calm state": Calm(threshold=calm_state, candidate_layer=1, exit_conf_type="state"),
        "calm fixed k": Calm(threshold=calm_soft, candidate_layer=1, vocab=VocabPruning(k=16)),
        "calm decaying": Calm(threshold=calm_soft, candidate_layer=1, vocab=VocabPruning(type_vocab_reduct="decaying")),
        "free": Free(shallow_exit_layer=n // 2, threshold=free),
        "free rollback": Free(shallow_exit_layer=n // 2, threshold=free, rollback_threshold=1.0),
        "free adaptive": Free(shallow_exit_layer=n // 2, threshold=free, use_adapt_threshold=True),
        "self-spec": SelfSpec(draft_exit_layer=n // 2, num_draft_tokens=2),
        "self-spec fixed k": SelfSpec(draft_exit_layer=n // 2, num_draft_tokens=3, vocab=VocabPruning(k=16)),
    }
    if family not in SEQ2SEQ:
        policies.update({
            "skip static": Skip(skip_mode="static", budget=0.5),
            "skip random": Skip(skip_mode="random", budget=0.5),
            "skip early-exit": Skip(skip_mode="early-exit", budget=0.5, skip_prompt=True),
        })
    return policies


def _fresh(policy):
    """The same policy with a fresh adaptive-threshold estimator (one is shared across sequences)."""
    if isinstance(policy, Free) and policy.use_adapt_threshold:
        return Free(shallow_exit_layer=policy.shallow_exit_layer, threshold=policy.threshold, use_adapt_threshold=True)
    return policy


def _model(family: str):
    """A float32 tiny model whose final norm is scaled up 10x: a random model's next-token distributions are
    nearly flat, sharper ones make confidences differ between tokens, so rows exit at different places, FREE
    synchronizes after shallow tokens and rolls some back."""
    model, _ = tiny_model(family, num_layers=4) if family in SEQ2SEQ else tiny_model(family)
    model = model.float()
    norm = get_adapter(model).final_norm
    if family not in SEQ2SEQ and norm is not None and getattr(norm, "weight", None) is not None:  # T5's are sharp
        with torch.no_grad():
            norm.weight.mul_(10)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_of_a_batch_decodes_as_if_alone(family):
    model = _model(family)
    prompts = _prompts()
    exited_somewhere = []
    for name, policy in _policies(model, family, prompts).items():
        batched = decode_rows(model, prompts, NEW, _fresh(policy), batch_size=len(prompts), eos_token_id=[])
        # one sequence at a time, as FREE's adaptive threshold fits once per batch: each row alone with a fresh one
        for k, (ids, row) in enumerate(zip(prompts, batched, strict=True)):
            alone = decode(model, ids, NEW, _fresh(policy), eos_token_id=[])
            where = (family, name, k)
            assert torch.equal(row.sequences, alone.sequences), where
            assert row.exit_layers.tolist() == alone.exit_layers.tolist(), where
            assert row.num_layers_run.tolist() == alone.num_layers_run.tolist(), where
            assert (row.rollbacks, row.drafted, row.accepted) == (alone.rollbacks, alone.drafted, alone.accepted), where
            assert [len(c) for c in row.confidences] == [len(c) for c in alone.confidences], where
            assert sum(row.confidences, []) == pytest.approx(sum(alone.confidences, []), abs=1e-5), where
        layers = torch.cat([r.exit_layers[0] for r in batched])
        exited_somewhere.append((name, bool((layers < get_adapter(model).num_layers).any())))
    # the thresholds did make rows exit early (else the test would compare full-depth decoding only)
    early = dict(exited_somewhere)
    assert early["calm propagate"] and early["free"], exited_somewhere


def test_lock_step_decodes_the_batch_and_rollback_happens():
    model = _model("llama")
    prompts = _prompts()
    policy = _policies(model, "llama", prompts)["free rollback"]
    assert lockstep.unsupported(model, get_adapter(model), policy) is None
    ids, mask = pad_left(prompts)
    out = decode(model, ids, NEW, policy, eos_token_id=[], attention_mask=mask)
    assert out.rows is not None and len(out.rows) == len(prompts)
    assert out.rollbacks > 0  # the rewinding path ran
    assert out.sequences.shape == (len(prompts), ids.shape[1] + NEW)


def test_rows_end_at_their_own_end_of_sequence():
    model = _model("llama")
    prompts = _prompts()
    policy = Calm(threshold=_median_confidence(model, prompts, Calm(threshold=1.0, candidate_layer=1)),
                  candidate_layer=1)
    tokens = decode(model, prompts[1], NEW, policy, eos_token_id=[]).new_tokens()[0].tolist()
    stop = next(k for k in range(2, NEW) if tokens[k] not in tokens[:k])  # row 1 ends after stop + 1 tokens
    batched = decode_rows(model, prompts, NEW, policy, batch_size=4, eos_token_id=tokens[stop])
    for ids, row in zip(prompts, batched, strict=True):
        alone = decode(model, ids, NEW, policy, eos_token_id=tokens[stop])
        assert torch.equal(row.sequences, alone.sequences)
    assert batched[1].new_tokens().shape[1] == stop + 1  # stopped at its end of sequence
    assert max(r.new_tokens().shape[1] for r in batched) == NEW  # while another row went on


def test_batches_lock_step_cannot_decode_go_row_by_row():
    model = _model("gemma3")  # sliding windows: FREE's rollback cannot mask a row's dropped positions there
    policy = Free(shallow_exit_layer=1, threshold=0.5, rollback_threshold=1.0)
    assert "sliding" in lockstep.unsupported(model, get_adapter(model), policy)
    prompts = _prompts(3)
    ids, mask = pad_left(prompts)
    out = decode(model, ids, 6, policy, eos_token_id=[], attention_mask=mask)
    for ids_k, row in zip(prompts, out.split(), strict=True):
        assert torch.equal(row.sequences, decode(model, ids_k, 6, policy, eos_token_id=[]).sequences)


def test_self_speculation_counts_a_round_its_end_of_sequence_cut_short():
    """The end of sequence on a draft ("draft", j, g, n) or on the bonus token after every draft matched ("bonus", g,
    n): the row stops and the round's g drafts and n matches are counted (08's default run once ended a row on a
    bonus token and failed on the draft-phase layout)."""
    from types import SimpleNamespace

    from effllm.decoding.state import Emitted

    engine = SimpleNamespace(max_new_tokens=10, eos=torch.tensor([7]), spec=True)
    for phase, counted in ((("draft", 1, 3, 1), (3, 1)), (("bonus", 2, 2), (2, 2))):
        row = lockstep._Row(prompt_len=4, phase=phase)
        lockstep.Lockstep._append(engine, row, Emitted(torch.tensor([[7]]), exit_layer=2))
        assert row.finished and (row.drafted, row.accepted) == counted and row.phase == ("start",), phase


def test_rows_split_into_even_batches_without_a_remainder_batch():
    from effllm.decoding.batched import _chunks

    for n, size, expected in [(102, 32, [34, 34, 34]), (34, 32, [34]), (100, 32, [34, 33, 33]), (1, 32, [1]),
                              (16, 32, [16]), (7, 2, [2, 2, 2, 1])]:
        chunks = _chunks(list(range(n)), size)
        assert [len(c) for c in chunks] == expected
        assert [i for c in chunks for i in c] == list(range(n))  # every row once, in order
