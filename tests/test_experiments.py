"""The experiment layer: runs, intervals, prompts, task evaluation with a policy, the frontier table."""

import math

import numpy as np
import pytest
import torch

from effllm import data, metrics
from effllm.decoding import Calm, Free, Full, Skip, StaticExit, decode
from effllm.experiments import evaluate, prompts, stats
from effllm.experiments.frontier import FrontierSettings, FrontierTable
from effllm.experiments.runs import normalize_settings, reference_quality, run_policies
from effllm.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def test_run_policies_times_a_subset_and_scores_every_prompt(tiny):
    model, tokenizer = tiny
    items = prompts.task_prompts(tokenizer, "builtin", 3, fmt="plain")
    run = run_policies(model, tokenizer, items, [StaticExit(2)], 5, rounds=2, speed_prompts=1, progress=False)
    # HF generate is the speed reference only: its quality rows are those of the timed prompt
    assert set(run.items.label) == {"hf_generate", "full", "static@2"} and len(run.items) == 3 + 3 + 1
    assert len(run.timings) == 6 and set(run.timings.prompt) == {0}  # 1 prompt x 3 labels x 2 rounds, batch 1
    assert (run.timings.new_tokens <= 5).all()
    summary = run.summary.set_index("label")
    assert summary.loc["static@2", "n_prompts"] == 3 and summary.loc["hf_generate", "n_prompts"] == 1
    assert summary.loc["static@2", "new_tokens"] == run.items[run.items.label == "static@2"].new_tokens.sum()
    ratios = (run.timings.pivot(index="round", columns="label", values="tokens_per_s")
              .pipe(lambda t: t["static@2"] / t["hf_generate"]))  # one prompt: the median of its rounds' ratios
    assert summary.loc["static@2", "speedup_vs_hf"] == pytest.approx(float(ratios.median()))
    assert summary.loc["static@2", "n_speed_prompts"] == 1 and summary.loc["static@2", "rounds"] == 2
    assert math.isnan(summary.loc["static@2", "speedup_vs_hf_ci_low"])  # no interval over one prompt
    assert summary.loc["static@2", "speedup_vs_hf_round_min"] <= summary.loc["static@2", "speedup_vs_hf_round_max"]
    # references have their text ROUGE-L against the task's answers
    assert summary.loc["full", "rougeL_vs_reference"] == pytest.approx(
        np.mean([metrics.rouge_l([t], [p.reference]) for t, p in
                 zip(run.items[run.items.label == "full"].text, items, strict=True)]))
    for label in summary.index.drop("hf_generate"):  # (one prompt: no interval)
        assert summary.loc[label, "rougeL_vs_full_ci_low"] <= summary.loc[label, "rougeL_vs_full"] \
            <= summary.loc[label, "rougeL_vs_full_ci_high"]


def test_run_policies_scores_squad_answers_up_to_the_end_of_sequence(tiny):
    model, tokenizer = tiny
    base = prompts.task_prompts(tokenizer, "builtin", 2, fmt="plain")
    run = run_policies(model, tokenizer, base, [StaticExit(2)], 6, hf=False, rounds=1, stop_at_eos=False,
                       progress=False)
    texts = run.items[run.items.label == "full"].text.tolist()
    # gold answers: the full model's own first new token for prompt 0 (EM 1 however the text goes on), and a word
    # it does not say for prompt 1
    first = run.outputs["full"][0].new_tokens()[0]
    answer0 = tokenizer.decode(first[:1], skip_special_tokens=True).strip().split("\n")[0]
    squad = [prompts.Prompt(p.input_ids, p.text, "x", "squad", i, answers)
             for i, (p, answers) in enumerate(zip(base, [(answer0 or "x",), ("zzzz-not-said",)], strict=True))]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(first[1])  # the second new token ends the answer: the first is it
    try:
        scored = run_policies(model, tokenizer, squad, [StaticExit(2)], 6, hf=False, rounds=1, progress=False)
        fixed = run_policies(model, tokenizer, squad, [StaticExit(2)], 6, hf=False, rounds=1, stop_at_eos=False,
                             progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    full = scored.items[scored.items.label == "full"].reset_index()
    assert full.new_tokens[0] == first.tolist().index(int(first[1])) + 1  # decoding stopped at the end of sequence
    # fixed length ran past it, but the answer (and its text) ends there all the same
    assert fixed.items[fixed.items.label == "full"].new_tokens.tolist() == [6, 6]
    assert fixed.items[fixed.items.label == "full"].text.tolist() == full.text.tolist()
    if answer0:
        assert full.squad_exact_match[0] == 1.0 and full.squad_f1[0] == 1.0
    assert full.squad_exact_match[1] == 0.0
    summary = scored.summary.set_index("label")
    assert summary.loc["full", "squad_f1"] == pytest.approx(full.squad_f1.mean())
    assert summary.loc["full", "squad_f1_ci_low"] <= summary.loc["full", "squad_f1"] <= summary.loc["full",
                                                                                                    "squad_f1_ci_high"]
    assert "squad_f1" not in run.summary  # prompts without gold answers get no SQuAD columns
    # per task: the same means as the items, SQuAD columns only for SQuAD
    table = reference_quality(scored.items, squad).set_index(["task", "label"])
    assert table.loc[("squad", "full"), "squad_f1"] == pytest.approx(full.squad_f1.mean())
    assert table.loc[("squad", "full"), "n_prompts"] == 2
    builtin = reference_quality(run.items, base)
    assert set(builtin.task) == {"arithmetic", "humaneval"} and "squad_f1" not in builtin
    one = builtin.set_index(["task", "label"]).loc[("arithmetic", "full")]
    assert one.n_prompts == 1 and one.rougeL_vs_reference == pytest.approx(
        metrics.rouge_l([texts[0]], [base[0].reference]))
    with pytest.raises(ValueError, match="do not have"):
        reference_quality(run.items, base[:1])


def test_settings_need_unique_labels_and_policies():
    with pytest.raises(ValueError, match="used twice"):
        normalize_settings([("a", Full()), ("a", StaticExit(2))])
    with pytest.raises(ValueError, match="must be a decoding policy"):
        normalize_settings({"a": {"method": "calm"}})
    assert list(normalize_settings([Calm(), StaticExit(3)])) == ["calm-softmax", "static@3"]


def test_mean_ci_and_paired_difference():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 200)
    mean, low, high = stats.mean_ci(x)
    assert mean == pytest.approx(x.mean()) and low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(200), rel=0.15)  # normal theory
    small = stats.mean_ci(x[:20])
    assert small[2] - small[1] > high - low  # fewer items, wider interval
    y = x + rng.normal(0.1, 0.01, 200)  # nearly the same items, shifted: a tight paired interval
    diff, d_low, d_high = stats.paired_difference_ci(y, x)
    assert d_low < diff < d_high and d_high - d_low < 0.01 and diff == pytest.approx(0.1, abs=0.01)
    assert stats.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in stats.mean_ci([0.3])[1:])
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference_ci([1, 2], [1])
    assert stats.ratio_summary([1.2, 0.8, 1.0]) == {"median": 1.0, "min": 0.8, "max": 1.2}


def test_answer_examples_come_from_the_train_split_and_never_share_an_evaluation_item(tiny):
    _, tokenizer = tiny
    test = prompts.task_prompts(tokenizer, "arithmetic", 3, fmt="plain")
    examples = prompts.answer_examples(tokenizer, "arithmetic", 2, offset=3, fmt="plain")
    train = prompts.task_prompts(tokenizer, "arithmetic", 2, offset=3, fmt="plain", split="train")
    assert [p.index for p in test] == [0, 1, 2]
    for (ids, mask), source in zip(examples, train, strict=True):
        assert torch.equal(ids[:, : source.input_ids.shape[1]], source.input_ids)  # the train split's items
        assert mask.any() and not any(torch.equal(ids[:, : p.input_ids.shape[1]], p.input_ids) for p in test
                                      if p.input_ids.shape[1] <= ids.shape[1])
    # more examples than the 48-item test split has (notebook 03's default asks for 48 after 12 prompts)
    assert len(prompts.answer_examples(tokenizer, "arithmetic", 60, offset=12, fmt="plain")) == 60
    # a test-only set (HumanEval) falls back to its evaluation split, past the evaluation prompts
    [(ids, _)] = prompts.answer_examples(tokenizer, "humaneval", 1, offset=5, fmt="plain", max_len=4096)
    fifth = prompts.task_prompts(tokenizer, "humaneval", 1, offset=5, fmt="plain")[0]
    assert torch.equal(ids[:, : fifth.input_ids.shape[1]], fifth.input_ids)
    assert data.splits("humaneval") == ("test",) and "train" in data.splits("arithmetic")
    with pytest.raises(ValueError, match="Unknown data set"):
        data.splits("no-such-set")


def test_completion_with_a_policy_is_the_policys_decoding(tiny):
    model, tokenizer = tiny
    prompt_ids = [tokenizer("def f(x):", add_special_tokens=False)["input_ids"]]
    policy = Skip("static", budget=0.5)
    [text] = evaluate.complete(model, tokenizer, prompt_ids, 6, policy=policy)
    out = decode(model, torch.tensor(prompt_ids), 6, policy)
    assert text == tokenizer.decode(out.new_tokens()[0], skip_special_tokens=True)
    [hf_text] = evaluate.complete(model, tokenizer, prompt_ids, 6)
    assert hf_text == evaluate.complete(model, tokenizer, prompt_ids, 6, policy=Full())[0]


def test_frontier_table_rows(tiny):
    model, tokenizer = tiny
    items = prompts.task_prompts(tokenizer, "builtin", 2, fmt="plain")
    eval_tokens = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(0))
    settings = FrontierSettings(eval_seq_len=32, eval_windows=2, speed_prompts=2, rounds=2, prefill_min_run_time=0.01,
                                progress=False)
    table = FrontierTable(model, tokenizer, items, 4, prefill_ids=items[0].input_ids, eval_tokens=eval_tokens,
                          settings=settings)
    dense = table.add_model("dense", "dense", model)
    assert dense["rougeL_vs_dense"] == 1.0 and dense["identical_to_dense"] == 1.0 and dense["n_prompts"] == 2
    assert dense["perplexity"] == pytest.approx(metrics.perplexity(model, eval_tokens, seq_len=32, max_windows=2))
    skip = table.add_decoder("skip half", "skip", model, Skip("static", budget=0.5), "dense")
    assert skip["parameters_M"] == dense["parameters_M"] and math.isnan(skip["perplexity"])
    assert skip["n_speed_prompts"] == 0 and len(table.pending) == 2  # timed together when the table is read
    frame = table.frame()
    assert not table.pending and list(frame.method) == ["dense", "skip half"]
    # the dense row reads the dense model's own calls: exactly 1, and one set of dense calls for every row
    assert dense["speedup_vs_dense"] == 1.0 and dense["tokens_per_s"] == skip["dense_tokens_per_s"]
    # paired per prompt (2 prompts x 2 rounds, batch 1): the mean ratio inside its interval over prompts
    assert skip["speedup_vs_dense_ci_low"] <= skip["speedup_vs_dense"] <= skip["speedup_vs_dense_ci_high"]
    assert skip["speedup_vs_dense_round_min"] <= skip["speedup_vs_dense_round_max"]
    assert skip["n_speed_prompts"] == 2 and skip["rounds"] == 2 and skip["decoded_to"] == "eos"
    assert "speedup_vs_dense_min" not in skip and skip["dense_tokens_per_s"] > 0
    assert skip["avg_layers"] == pytest.approx((4 + 3 * 2) / 4)  # first token at full depth, then 2 of 4
    with pytest.raises(ValueError, match="no row labelled 'pruned'"):
        table.add_decoder("x", "skip", model, Skip("static", budget=0.5), "pruned")
    with pytest.raises(ValueError, match="already in the table"):
        table.add_decoder("skip half", "skip", model, Skip("static", budget=0.5), "dense")
    assert list(table.frame().method) == ["dense", "skip half"]


def test_frontier_rows_timed_one_by_one_or_not_at_all(tiny):
    model, tokenizer = tiny
    items = prompts.task_prompts(tokenizer, "builtin", 2, fmt="plain")
    eval_tokens = torch.randint(3, 250, (200,), generator=torch.Generator().manual_seed(0))
    settings = FrontierSettings(eval_seq_len=32, eval_windows=2, speed_prompts=2, rounds=2, prefill_min_run_time=0.01,
                                progress=False, time_together=False, timed=("dense", "skip*"))
    table = FrontierTable(model, tokenizer, items, 4, prefill_ids=items[0].input_ids, eval_tokens=eval_tokens,
                          settings=settings)
    table.add_model("dense", "dense", model)
    skip = table.add_decoder("skip half", "skip", model, Skip("static", budget=0.5), "dense")
    assert skip["n_speed_prompts"] == 2 and not table.pending  # timed as it was added
    calm = table.add_decoder("calm", "calm", model, Calm(threshold=0.5, candidate_layer=1), "dense")
    assert calm["n_speed_prompts"] == 0 and math.isnan(calm["speedup_vs_dense"])  # not named by `timed`
    assert calm["rougeL_vs_dense"] >= 0 and calm["n_prompts"] == 2  # its quality stands all the same
    assert FrontierSettings(timed="skip").timed == ("skip",)
    table.settings = FrontierSettings(timed=("skip", "CALM", "!* + *"))
    assert [table._timed(x) for x in ("skip half", "CALM 0.9", "CALM 0.9 + vocab k=4", "dense")] == [
        True, True, False, False]


def test_decode_step_profile_accounts_for_the_whole_step(tiny):
    from effllm.experiments.timing import OP_GROUPS, _op_group, decode_step_profile

    model, tokenizer = tiny
    ids = prompts.task_prompts(tokenizer, "builtin", 1, fmt="plain")[0].input_ids
    result = decode_step_profile(model, ids, steps=4, repeats=1)
    groups = result["groups"]
    assert result["ms_per_token"] > 0 and result["steps"] == 4
    matmul = next(iter(OP_GROUPS))
    runs = result["seconds"]
    assert set(runs) == {"prompt pass", "prompt pass + 4 steps"}
    assert all(run[matmul] > 0 for run in runs.values())  # the linear layers' matmuls ran and were seen
    assert groups[matmul] == pytest.approx(
        max(0.0, 1e3 * (runs["prompt pass + 4 steps"][matmul] - runs["prompt pass"][matmul]) / 4))
    assert all(v >= 0 for v in groups.values())
    assert "outside aten operators (Python, dispatch, profiler)" in groups
    assert _op_group("aten::addmm") == _op_group("aten::mm") == "matmul (linear layers and head)"
    assert _op_group("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention kernel"
    assert _op_group("aten::mul").startswith("other operators") and _op_group("ProfilerStep#1") == "other"
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        decode_step_profile(model, ids, steps=0)


def test_forward_cost_sees_the_same_context_every_call(tiny):
    from effllm.experiments.timing import forward_cost

    model, _ = tiny
    rows = forward_cost(model, context_tokens=16, token_counts=(1, 4), min_run_time=0.01)
    assert [r["tokens"] for r in rows] == [1, 4] and rows[0]["x_one_token"] == 1.0
    assert rows[1]["x_one_token"] == pytest.approx(rows[1]["ms"] / rows[0]["ms"])
    with pytest.raises(ValueError, match="token_counts must be positive integers"):
        forward_cost(model, token_counts=(0,))


def test_time_rounds_runs_every_label_once_a_round_in_a_seeded_shuffled_order():
    from effllm.experiments.timing import seconds_by_label, time_rounds

    calls = []
    labels = [f"s{i}" for i in range(5)]
    timed = time_rounds({label: (lambda label=label: calls.append(label) or label) for label in labels}, 4, seed=3)
    orders = [[t.label for t in timed if t.round == r] for r in range(4)]
    assert all(sorted(order) == labels for order in orders)  # each label once per round
    assert calls == [t.label for t in timed] and all(t.value == t.label for t in timed)
    assert len({tuple(o) for o in orders}) > 1  # the order changes between rounds
    again = time_rounds({label: (lambda: None) for label in labels}, 4, seed=3)
    assert [t.label for t in again] == [t.label for t in timed]  # same seed, same order
    per_label = seconds_by_label(time_rounds({"a": lambda: None, "b": lambda: None}, 3,
                                             measure=lambda fn: (7.0, fn())))
    assert per_label == {"a": [7.0] * 3, "b": [7.0] * 3} or per_label == {"b": [7.0] * 3, "a": [7.0] * 3}
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_rounds({"a": lambda: None}, 0)
    with pytest.raises(ValueError, match="calls is empty"):
        time_rounds({}, 2)


def test_run_policies_options_and_keywords_agree(tiny):
    from effllm.experiments.runs import RunOptions

    model, tokenizer = tiny
    items = prompts.task_prompts(tokenizer, "builtin", 2, fmt="plain")
    by_keywords = run_policies(model, tokenizer, items, [StaticExit(2)], 4, hf=False, rounds=2, progress=False)
    by_options = run_policies(model, tokenizer, items, [StaticExit(2)], 4, RunOptions(hf=False, rounds=2,
                                                                                      progress=False))
    assert by_keywords.items.drop(columns="text").equals(by_options.items.drop(columns="text"))
    # one batch-1 call per (label, prompt) per round: 2 labels x 2 prompts x 2 rounds
    assert len(by_options.timings) == 8 and set(by_options.timings.label) == {"full", StaticExit(2).label}
    assert RunOptions().stop_at_eos and RunOptions().rounds == 5 and RunOptions().speed_prompts == 8
    assert RunOptions().batch_size == 32
    with pytest.raises(TypeError, match="unknown keyword.*'round'.*allowed: exit_transform"):
        run_policies(model, tokenizer, items, [StaticExit(2)], 4, round=2)
    assert RunOptions(speed_prompts=0).speed_prompts == 0  # quality only
    with pytest.raises(ValueError, match="speed_prompts"):
        RunOptions(speed_prompts=-1)


class _StubPolicy:
    method = "calm"

    def __init__(self, kv_mode):
        self.kv_mode = kv_mode


def test_frontier_costs_a_policy_by_its_kv_mode():
    from effllm.experiments.frontier import policy_kv_mode

    assert [policy_kv_mode(_StubPolicy(m)) for m in ("propagate", "deferred", "none")] == [
        "propagate", "deferred", "none"]  # the policy's own kv_mode wins over its family
    assert policy_kv_mode(Calm("softmax", 0.9, 2)) == "propagate"
    assert policy_kv_mode(Calm("softmax", 0.9, 2, kv="deferred")) == "deferred"  # pending, run later
    assert policy_kv_mode(Skip("random", budget=0.5, kv="none")) == "none"
    assert policy_kv_mode(Skip("random", budget=0.5)) == "propagate"
    assert policy_kv_mode(Skip("static", budget=0.5)) == "none"  # a static pattern never computes skipped K/V
    assert policy_kv_mode(StaticExit(2)) == "none" and policy_kv_mode(Free(2)) == "deferred"
    with pytest.raises(ValueError, match="kv_mode is 'pending'; allowed: propagate, deferred, none"):
        policy_kv_mode(_StubPolicy("pending"))


def test_open_session_loads_on_the_device_asked_for(tiny):
    from effllm.experiments.session import open_session, resolve_device

    session = open_session("tiny-llama", "cpu", "float32")
    model, tokenizer, device, machine = session
    assert device == torch.device("cpu") and next(model.parameters()).device == device
    assert session.dtype == torch.float32 and machine.startswith("CPU (") and tokenizer is session.tokenizer
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_translation_sampling_must_be_a_sampling():
    with pytest.raises(ValueError, match=r"sampling must be a Sampling\(seed=\.\.\., temperature"):
        evaluate.translation_best_of(None, None, "wmt14", 1, sampling=3)
