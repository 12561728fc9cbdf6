"""The decoding core beyond the seeds' methods: padded batches, self-speculation, policies as objects, bad input,
and the package's import graph."""

import ast
import dataclasses
import pathlib

import pytest
import torch

from effllm import exits
from effllm.adapters import get_adapter
from effllm.decoding import Calm, Free, Full, SelfSpec, Skip, StaticExit, VocabPruning, decode
from effllm.models import tiny_model

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "opt", "gpt2"]


def _prompt(seed, batch=1, length=7):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(model, ids, n, eos=None, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    bound = {} if eos is not None else {"min_new_tokens": n}
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0 if eos is None else eos, **bound)


# ---- padded batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_left_padded_batch_decodes_each_row_as_if_alone(family):
    model, _ = tiny_model(family)
    rows = [_prompt(1, length=9)[0], _prompt(2, length=5)[0], _prompt(3, length=7)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, row in enumerate(rows):
        ids[k, width - len(row):] = row
        mask[k, width - len(row):] = 1
    outputs = {}
    for policy in (Full(), StaticExit(2)):  # the two policies that decode batches
        outputs[policy.label] = out = decode(model, ids, 8, policy, eos_token_id=[], attention_mask=mask)
        for k, row in enumerate(rows):
            alone = decode(model, row.unsqueeze(0), 8, policy, eos_token_id=[])
            assert torch.equal(out.sequences[k, width:], alone.sequences[0, len(row):]), (family, policy, k)
    # and the full-depth batch is what HF generate gives for the same padded batch
    assert torch.equal(outputs["full"].sequences, _hf(model, ids, 8, mask=mask))


def test_padded_batch_rules():
    model, _ = tiny_model("llama")
    ids = _prompt(4, batch=2)
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    with pytest.raises(ValueError, match="pads on the right"):
        decode(model, ids, 3, Full(), attention_mask=right)
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        decode(model, ids, 3, Full(), attention_mask=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="input_ids' shape"):
        decode(model, ids, 3, Full(), attention_mask=torch.ones(2, 3, dtype=torch.long))
    # a single padded row loses its padding and decodes as if alone, with any policy
    padded, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], 1), torch.ones(1, 10, dtype=torch.long)
    mask[0, :3] = 0
    policy = Calm(threshold=0.0, candidate_layer=2)
    alone = decode(model, ids[:1], 5, policy, eos_token_id=[])
    with_padding = decode(model, padded, 5, policy, eos_token_id=[], attention_mask=mask)
    assert torch.equal(with_padding.sequences[0, 10:], alone.sequences[0, 7:])


def test_t5_batch_with_encoder_padding_decodes_each_row_as_if_alone():
    model, _ = tiny_model("t5", num_layers=4)
    short, long = _prompt(5, length=5), _prompt(6, length=9)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, :5], mask[0, :5] = short[0], 1  # T5 pads the encoder input on the right
    ids[1], mask[1] = long[0], 1
    out = decode(model, ids, 6, Full(), eos_token_id=[], attention_mask=mask)
    for k, row in enumerate((short, long)):
        alone = decode(model, row, 6, Full(), eos_token_id=[])
        assert torch.equal(out.sequences[k], alone.sequences[0]), k


# ---- self-speculation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [*DECODER_FAMILIES, "t5"])
@pytest.mark.parametrize("draft", [1, 2, 3])
def test_self_speculation_equals_full_depth_greedy(family, draft):
    model, _ = tiny_model(family, **({"num_layers": 4} if family == "t5" else {}))
    ids = _prompt(7, length=8)
    full = decode(model, ids, 20, Full(), eos_token_id=[])
    for n_draft in (1, 3, 8):
        out = decode(model, ids, 20, SelfSpec(draft, n_draft), eos_token_id=[])
        assert torch.equal(out.sequences, full.sequences), (family, draft, n_draft)
        assert 0 <= out.accepted <= out.drafted and out.drafted > 0


def test_self_speculation_accepts_every_draft_of_a_perfect_drafter():
    """Zero the last layer's output projections: it passes the residual stream on unchanged, so the exit at layer
    L - 1 is the full model and every draft is accepted; a round emits num_draft_tokens + 1 tokens."""
    model, _ = tiny_model("llama")
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.attention_projections(3)["o"].weight.zero_()
        adapter.mlp_projections(3)["down"].weight.zero_()
    ids = _prompt(8)
    out = decode(model, ids, 17, SelfSpec(3, 4), eos_token_id=[])
    assert torch.equal(out.sequences, decode(model, ids, 17, Full(), eos_token_id=[]).sequences)
    # 16 tokens after the prefill's: rounds of 4 drafts + 1 (x3), then 1 token with nothing left to draft
    assert (out.drafted, out.accepted, out.acceptance_rate) == (12, 12, 1.0)


def test_self_speculation_with_a_pruned_draft_vocabulary_is_still_exact():
    model, _ = tiny_model("gemma3")
    ids = _prompt(9)
    full = decode(model, ids, 16, Full(), eos_token_id=[])
    for k in (2, 16, 384):
        out = decode(model, ids, 16, SelfSpec(1, 4, vocab=VocabPruning("fixed", k)), eos_token_id=[])
        assert torch.equal(out.sequences, full.sequences)
    with pytest.raises(ValueError, match="type_vocab_reduct='fixed'"):
        decode(model, ids, 4, SelfSpec(1, 4, vocab=VocabPruning("decaying", 16)))


def test_self_speculation_stops_at_end_of_sequence_like_greedy():
    model, _ = tiny_model("llama")
    ids = _prompt(10)
    full = decode(model, ids, 30, Full(), eos_token_id=[])
    eos = int(full.sequences[0, ids.shape[1] + 5])  # a token the model emits at step 5
    expected = _hf(model, ids, 30, eos=eos)
    out = decode(model, ids, 30, SelfSpec(draft_exit_layer=2, num_draft_tokens=4), eos_token_id=eos)
    assert torch.equal(out.sequences, expected)


# ---- policies as objects ---------------------------------------------------------------------------------


def test_policies_validate_when_built_and_against_the_model():
    with pytest.raises(ValueError, match="allowed: softmax, state, meta"):
        Calm(exit_conf_type="entropy")
    with pytest.raises(ValueError, match="needs meta_classifier"):
        Calm(exit_conf_type="meta")
    with pytest.raises(ValueError, match="use_adapt_threshold"):
        Free(shallow_exit_layer=2, adapt_threshold=object())
    with pytest.raises(ValueError, match="candidate_layer=1 is used only with vocabulary pruning"):
        Free(shallow_exit_layer=2, candidate_layer=1)
    with pytest.raises(ValueError, match="skip_mode='random' takes budget"):
        Skip("random")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SelfSpec(2, 0)
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="draft_exit_layer must be a layer between 1 and 3"):
        decode(model, _prompt(0), 3, SelfSpec(4))
    with pytest.raises(ValueError, match="candidate_layer must be a layer between 1 and 1"):
        decode(model, _prompt(0), 3, Free(2, vocab=VocabPruning(), candidate_layer=2))
    with pytest.raises(ValueError, match="policy must be an effllm.decoding policy"):
        decode(model, _prompt(0), 3, "calm")


def test_policy_columns_and_labels():
    calm = Calm(threshold=0.8, candidate_layer=10, vocab=VocabPruning("fixed", 64))
    assert calm.columns() == {"method": "calm", "exit_conf_type": "softmax", "threshold": 0.8,
                              "candidate_layer": 10, "exit_position_temp": None, "kv": "propagate",
                              "type_vocab_reduct": "fixed", "k": 64, "k_min": 64}
    assert Free(20, 0.5, vocab=VocabPruning("fixed", 64)).columns() == {
        "method": "free", "shallow_exit_layer": 20, "threshold": 0.5, "shallow2deep_conf_type": "softmax",
        "use_adapt_threshold": False, "rollback_threshold": None, "type_vocab_reduct": "fixed", "k": 64, "k_min": 64,
        "candidate_layer": 10}  # the default candidate layer is filled in: the shallow exit's middle
    assert calm.label == "calm-softmax-fixed64"
    assert Full().columns() == {"method": "full"} and StaticExit(5).label == "static@5"
    assert Free(20, use_adapt_threshold=True, rollback_threshold=2.0).label == "free@20-adaptive-rollback"
    assert SelfSpec(10, 4).columns() == {"method": "self-spec", "draft_exit_layer": 10, "num_draft_tokens": 4,
                                         "type_vocab_reduct": "none"}


def test_exit_position_temp_sets_the_decay():
    """CALM's decaying threshold uses the seed's temperature: lambda (0.9 + 0.1 exp(-temp t / N))."""
    assert Calm(threshold=0.9).threshold_at(5, 10) == 0.9
    slow, fast = Calm(exit_position_temp=1.0), Calm(exit_position_temp=8.0)
    assert slow.threshold_at(5, 10) == pytest.approx(0.9 * (0.9 + 0.1 * 2.718281828 ** -0.5))
    assert fast.threshold_at(5, 10) < slow.threshold_at(5, 10)
    model, _ = tiny_model("llama")
    out = decode(model, _prompt(1), 6, Calm(threshold=2.0, exit_position_temp=8.0), eos_token_id=[])
    # generated token k (from 0) is checked at position k + 1, token 0 included (fast_robust_early_exit
    # util/skip_conf.py:60-63 with pos_time = past length + 1, models/deploying_t5.py:926)
    assert out.thresholds == pytest.approx([2.0 * (0.9 + 0.1 * 2.718281828 ** (-8.0 * (k + 1) / 6)) for k in range(6)])


def test_calm_exits_only_above_the_threshold():
    """get_skip_mask keeps a token whose confidence equals the threshold (``conf <= threshold``: skip_conf.py:76);
    with a constant 0.5 meta confidence, threshold 0.5 never exits and 0.4999 always does, from token 0."""
    model, _ = tiny_model("llama", num_hidden_layers=6)

    def half(layer, hidden):
        return torch.tensor(0.5)

    at = decode(model, _prompt(2), 5, Calm("meta", 0.5, 2, meta_classifier=half), eos_token_id=[])
    below = decode(model, _prompt(2), 5, Calm("meta", 0.4999, 2, meta_classifier=half), eos_token_id=[])
    assert (at.exit_layers == 6).all() and (below.exit_layers == 2).all()


# ---- bad input -------------------------------------------------------------------------------------------


def test_options_a_method_would_ignore_are_refused():
    model, _ = tiny_model("llama")
    ids = _prompt(2)
    with pytest.raises(ValueError, match="exit_conf_threshold belong to method='calm', not method='skip'"):
        exits.generate(model, ids, 3, method="skip", exit_conf_threshold=0.5)
    with pytest.raises(ValueError, match="budget belong to method='skip'"):
        exits.generate(model, ids, 3, method="calm", budget=0.5)
    with pytest.raises(ValueError, match="exit_transform belongs to the early-exit methods"):
        exits.generate(model, ids, 3, method="skip", exit_transform=lambda layer, h: h)
    with pytest.raises(TypeError, match="unexpected keyword"):
        exits.generate(model, ids, 3, method="calm", treshold=0.5)
    # an option left at its default changes nothing and is accepted
    assert exits.generate(model, ids, 3, method="full", exit_conf_type="softmax").sequences.shape == (1, 10)


def test_bad_token_ids_are_clear_errors():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="integer token ids"):
        decode(model, _prompt(0).float(), 3)
    with pytest.raises(ValueError, match=r"outside this model's vocabulary 0..383"):
        decode(model, torch.tensor([[5, 400]]), 3)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        decode(model, torch.tensor([[-1, 5]]), 3)
    with pytest.raises(ValueError, match=r"\[batch >= 1, length >= 1\]"):
        decode(model, torch.tensor([5, 6]), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        decode(model, _prompt(0), 0)


# ---- the import graph ------------------------------------------------------------------------------------


def _imports(path: pathlib.Path, package_root: pathlib.Path) -> set[str]:
    """effllm modules imported at module level (function-level imports are deliberate and lazy)."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("effllm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([node.module] if node.module else []))
            if base.startswith("effllm"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_package_has_no_import_cycles():
    root = pathlib.Path(__file__).resolve().parent.parent / "effllm"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _imports(path, root) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not (modules[name].name == "__init__.py" and m.startswith(name + "."))}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in visiting:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [nxt])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"


# ---- bfloat16 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2"])
def test_bfloat16_decoding_equals_hf_generate_and_self_speculation_stays_exact(family):
    """The embedded models load in bfloat16 where the CPU computes in it: with exits disabled the engine still
    gives HF generate's tokens in that dtype, and self-speculation still gives the engine's."""
    model, _ = tiny_model(family)
    model = model.to(torch.bfloat16)
    for seed in range(3):
        ids = _prompt(20 + seed, length=9)
        full = decode(model, ids, 16, Full(), eos_token_id=[])
        assert torch.equal(full.sequences, _hf(model, ids, 16)), (family, seed)
        for policy in (Calm(threshold=2.0, candidate_layer=1), Free(2, 2.0), SelfSpec(2, 4)):
            assert torch.equal(decode(model, ids, 16, policy, eos_token_id=[]).sequences, full.sequences), policy


def test_a_model_left_half_pruned_is_refused_by_decoding():
    from effllm.models import IncompleteModelError, mark_incomplete

    model, _ = tiny_model("llama")
    mark_incomplete(model, "pruning (wanda) was interrupted at layer 1 of 4 by KeyboardInterrupt; reload the model")
    with pytest.raises(IncompleteModelError, match="cannot decode: pruning .wanda. was interrupted at layer 1"):
        decode(model, _prompt(7), 3, Full())


def test_expected_speculative_speedup_matches_a_simulation_of_rounds():
    import numpy as np

    from effllm.decoding.speculative import expected_speedup, speedup_at_acceptance_rate

    # the ends: nothing accepted -> one token for (g + 1) E / L + (L - E) / L of a token; everything -> g + 1 tokens
    assert expected_speedup(0.0, 4, 20, 30) == pytest.approx(1 / (5 * 20 / 30 + 10 / 30))
    assert expected_speedup(1.0, 4, 20, 30) == pytest.approx(5 / (5 * 20 / 30 + 10 / 30))
    # a straightforward simulation of rounds: accept each draft with probability a until the first rejection
    rng = np.random.default_rng(0)
    for a, g, e, v in [(0.34, 4, 20, 1.0), (0.8, 4, 10, 1.5), (0.5, 2, 15, 1.0)]:
        rounds = 20000
        accepted = (rng.random((rounds, g)) < a).cumprod(axis=1).sum(axis=1)  # the accepted prefix's length
        tokens = (accepted + 1).sum()
        cost = rounds * ((g + 1) * e / 30 + (30 - e) / 30 * v)
        assert expected_speedup(a, g, e, 30, v) == pytest.approx(tokens / cost, rel=0.02)
        # the decoder's rate (accepted prefixes over all drafts) gives the simulated speed exactly, and is below a
        rate = accepted.sum() / (rounds * g)
        assert speedup_at_acceptance_rate(rate, g, e, 30, v) == pytest.approx(tokens / cost, rel=1e-9)
        assert rate < a
    # at layer 20 of 30 four drafts cannot reach 1.5x even if every draft were accepted and verifying were free
    assert expected_speedup(1.0, 4, 20, 30) < 1.5
    with pytest.raises(ValueError, match="acceptance"):
        expected_speedup(1.2, 4, 20, 30)
    with pytest.raises(ValueError, match="draft_layer"):
        expected_speedup(0.5, 4, 30, 30)


# ---- one name per concept: the seeds' names as deprecated aliases, kv_mode ---------------------------------


def test_seed_names_are_deprecated_aliases_of_the_policy_fields():
    with pytest.warns(DeprecationWarning, match=r"Calm\(exit_conf_threshold=...\) is deprecated; use threshold="):
        calm = Calm(exit_conf_threshold=0.7, exit_min_layer=20)
    assert calm == Calm(threshold=0.7, candidate_layer=20)
    with pytest.warns(DeprecationWarning):
        free = Free(shallow_exit_layer=20, shallow2deep_conf_threshold=0.6)
    assert free == Free(20, 0.6) and free.threshold == 0.6
    with pytest.warns(DeprecationWarning):
        assert Calm(state_propagation=False).kv == "deferred"
    with pytest.warns(DeprecationWarning):
        assert Skip("random", budget=0.5, skipped_kv="none").kv == "none"
    with pytest.warns(DeprecationWarning):
        assert Free(4, vocab=VocabPruning(), prune_layer=2).candidate_layer == 2
    with pytest.warns(DeprecationWarning, match=r"Calm.exit_conf_threshold is deprecated"):
        assert calm.exit_conf_threshold == 0.7  # reading the old name still works
    with pytest.warns(DeprecationWarning):
        assert Calm(kv="deferred").state_propagation is False
    with pytest.raises(TypeError, match="got both threshold= and exit_conf_threshold="):
        Calm(threshold=0.5, exit_conf_threshold=0.5)
    with pytest.raises(TypeError, match="got both threshold= and shallow2deep_conf_threshold="):
        Free(20, 0.5, shallow2deep_conf_threshold=0.5)  # positional counts as given
    with pytest.raises(ValueError, match="state_propagation must be True or False"):
        Calm(state_propagation="yes")
    with pytest.raises(ValueError, match="unknown kv 'pending'"):
        Calm(kv="pending")
    assert Free(20).shallow_exit_layer == 20  # positional construction as before
    with pytest.warns(DeprecationWarning):  # dataclasses.replace with a seed name replaces, as it always did
        assert dataclasses.replace(Calm(threshold=0.9), exit_conf_threshold=0.5) == Calm(threshold=0.5)


def test_every_policy_says_what_the_k_v_of_skipped_layers_is():
    assert Full().kv_mode == "none" and StaticExit(2).kv_mode == "none"
    assert Calm().kv_mode == "propagate" and Calm(kv="deferred").kv_mode == "deferred"
    assert Free(2).kv_mode == "deferred" and SelfSpec(2).kv_mode == "deferred"
    assert Skip("random", budget=0.5).kv_mode == "propagate" and Skip("random", budget=0.5, kv="none").kv_mode == "none"
    # a static pattern never runs a skipped layer again: no K/V whatever kv says
    assert Skip("static", budget=0.5).kv_mode == "none" and Skip("early-exit", budget=0.5).kv_mode == "none"
    with pytest.raises(AttributeError):
        Calm().kv_mode = "none"


def test_exit_layers_is_an_exit_layer_and_num_layers_run_a_count():
    model, _ = tiny_model("llama")
    ids = _prompt(3)
    calm = decode(model, ids, 6, Calm(threshold=0.0, candidate_layer=2), eos_token_id=[])
    assert torch.equal(calm.exit_layers, calm.num_layers_run)  # early exit: layers 1..l ran
    skip = decode(model, ids, 6, Skip("static", skip_pattern=[0, 2]), eos_token_id=[])
    assert skip.exit_layers[0].tolist() == [4] + [3] * 5  # the prompt's full depth, then the last kept layer
    assert skip.num_layers_run[0].tolist() == [4] + [2] * 5 and skip.avg_layers == pytest.approx(14 / 6)
    assert torch.equal(skip.new_tokens(), skip.sequences[:, ids.shape[1]:])
    with pytest.warns(DeprecationWarning, match="new_tokens"):
        assert torch.equal(skip.new_tokens(ids.shape[1]), skip.new_tokens())
