"""The measurement protocol of run_policies: decode to the end of sequence, quality in batches, paired timing."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from effllm.decoding import Calm, Free, StaticExit, decode
from effllm.experiments import prompts, stats
from effllm.experiments.runs import DECODED_TO_EOS, DECODED_TO_FIXED, run_policies, summarize
from effllm.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _synthetic_timings() -> pd.DataFrame:
    """3 prompts x 3 rounds of a setting "a" and a reference "ref", hand-made seconds and tokens."""
    seconds_a = [[1.0, 2.0, 1.0], [1.0, 1.0, 4.0], [2.0, 2.0, 2.0]]  # [prompt][round]
    tokens_a = [[10, 10, 10], [4, 4, 4], [6, 6, 6]]
    seconds_ref = [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0], [1.0, 3.0, 2.0]]
    tokens_ref = [[10, 10, 10], [8, 8, 8], [6, 6, 6]]
    rows = []
    for label, seconds, tokens in (("a", seconds_a, tokens_a), ("ref", seconds_ref, tokens_ref)):
        for p in range(3):
            for r in range(3):
                rows.append({"round": r, "label": label, "prompt": p, "seconds": seconds[p][r],
                             "new_tokens": tokens[p][r], "tokens_per_s": tokens[p][r] / seconds[p][r]})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the order the calls ran in does not matter


def test_paired_speed_ratio_is_the_mean_of_per_prompt_medians_with_a_bootstrap_interval():
    timings = _synthetic_timings()
    # per (prompt, round): (tokens_a / s_a) / (tokens_ref / s_ref)
    # prompt 0: 10/1 / (10/2) = 2, 10/2 / 5 = 1, 2            -> median 2
    # prompt 1: 4/1 / 8 = 0.5, 0.5, 4/4 / 8 = 0.125           -> median 0.5
    # prompt 2: 3 / 6 = 0.5, 3 / 2 = 1.5, 3 / 3 = 1           -> median 1
    expected = (2 + 0.5 + 1) / 3
    # pooled per round: (sum tokens_a / sum s_a) / (sum tokens_ref / sum s_ref)
    pooled = [(20 / 4) / (24 / 4), (20 / 5) / (24 / 6), (20 / 7) / (24 / 5)]
    speed = stats.paired_speedup(timings, "a", "ref")
    assert speed["mean"] == pytest.approx(expected)
    assert speed["ci_low"] < expected < speed["ci_high"]
    assert 0.5 <= speed["ci_low"] and speed["ci_high"] <= 2.0  # a mean of resampled per-prompt ratios
    assert speed["round_min"] == pytest.approx(min(pooled)) and speed["round_max"] == pytest.approx(max(pooled))
    assert speed["n_prompts"] == 3 and speed["rounds"] == 3
    assert stats.paired_speedup(timings, "a", "ref") == speed  # seeded
    same = stats.paired_speedup(timings, "ref", "ref")
    assert (same["mean"], same["ci_low"], same["ci_high"]) == (1.0, 1.0, 1.0)
    one = stats.paired_ratio_summary([[1.0]], [[1.0]], [[1.0]], [[2.0]])
    assert one["mean"] == 2.0 and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])  # one prompt: no interval
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_ratio_summary([[1.0]], [[1.0, 2.0]], [[1.0]], [[1.0]])
    # summarize writes the same numbers into the summary's columns
    items = pd.DataFrame([{"label": label, "method": "x", "prompt": p, "new_tokens": 5, "avg_layers": 4.0,
                           "rougeL_vs_full": 1.0, "token_agreement_vs_full": 1.0, "identical_to_full": True}
                          for label in ("full", "a") for p in range(3)])
    summary = summarize(items, timings.replace({"label": {"ref": "full"}}), hf=False)
    row = summary.set_index("label").loc["a"]
    assert row.speedup_vs_full == pytest.approx(expected)
    assert row.speedup_vs_full_ci_low < expected < row.speedup_vs_full_ci_high
    assert row.speedup_vs_full_round_min == pytest.approx(min(pooled))
    assert row.speedup_vs_full_round_max == pytest.approx(max(pooled))
    assert row.n_speed_prompts == 3 and row.rounds == 3 and "speedup_vs_hf" not in summary
    assert not {"speedup_vs_full_min", "speedup_vs_full_max"} & set(summary.columns)
    assert row.tokens_per_s == pytest.approx(float(np.median([20 / 4, 20 / 5, 20 / 7])))


def test_run_policies_decodes_to_the_end_of_sequence_unless_fixed_length(tiny):
    model, tokenizer = tiny
    items = prompts.task_prompts(tokenizer, "builtin", 2, fmt="plain")
    fixed = run_policies(model, tokenizer, items, [StaticExit(2)], 6, rounds=1, stop_at_eos=False, progress=False)
    assert (fixed.items.new_tokens == 6).all() and (fixed.timings.new_tokens == 6).all()
    assert (fixed.summary.decoded_to == DECODED_TO_FIXED).all()
    assert DECODED_TO_FIXED == "fixed length (end of sequence ignored)"
    tokens = fixed.outputs["full"][0].new_tokens()[0].tolist()
    eos = tokens[1]  # the token full depth emits second ends the answer
    answer = tokens.index(eos) + 1  # up to and including its first occurrence
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        run = run_policies(model, tokenizer, items, [StaticExit(2)], 6, rounds=1, progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    full = run.items[run.items.label == "full"].set_index("prompt")
    assert full.loc[0, "new_tokens"] == answer < 6
    hf = run.items[run.items.label == "hf_generate"].set_index("prompt")
    assert hf.loc[0, "new_tokens"] == answer and hf.identical_to_full.all()  # HF generate stops there too
    timed = run.timings[(run.timings.label == "full") & (run.timings.prompt == 0)]
    assert (timed.new_tokens == answer).all()  # speed counts the tokens generated
    assert (run.summary.decoded_to == DECODED_TO_EOS).all()
    assert run.summary.set_index("label").loc["full", "new_tokens"] == full.new_tokens.sum()


def test_batched_quality_equals_decoding_each_prompt_alone(tiny):
    model, tokenizer = tiny
    assert next(model.parameters()).dtype == torch.float32
    items = prompts.task_prompts(tokenizer, "builtin", 3, fmt="plain")
    assert len({p.input_ids.shape[1] for p in items}) > 1  # different lengths: the batch is left-padded
    # thresholds low enough for the tiny random model's small softmax gaps: some tokens exit early, some do not
    settings = {"calm": Calm("softmax", 0.003, 1), "free": Free(2, 0.003)}
    run = run_policies(model, tokenizer, items, settings, 8, hf=False, rounds=1, speed_prompts=1, batch_size=3,
                       progress=False)
    summary = run.summary.set_index("label")
    assert all(1 < summary.loc[label, "avg_layers"] < 4 for label in settings)  # the rows exit on their own
    for label, policy in settings.items():
        for k, prompt in enumerate(items):
            alone = decode(model, prompt.input_ids, 8, policy)
            batched = run.outputs[label][k]
            assert torch.equal(batched.new_tokens(), alone.new_tokens()), (label, k)
            assert torch.equal(batched.exit_layers, alone.exit_layers), (label, k)
        assert run.items[run.items.label == label].new_tokens.tolist() == [
            o.new_tokens().shape[1] for o in run.outputs[label]]
    # speed at batch 1 on the first prompt only, every setting and the reference once per round
    assert set(run.timings.prompt) == {0} and len(run.timings) == 3


def test_only_the_timed_settings_get_speed_and_the_full_depth_outputs_come_from_the_cache(tiny, tmp_path, monkeypatch):
    from effllm.decoding import batched
    from effllm.experiments import reference_cache

    model, tokenizer = tiny
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    ids = [torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 6)]
    settings = {"static@2": StaticExit(2), "calm": Calm(threshold=0.5, candidate_layer=1)}
    calls = []
    real = batched.decode_rows
    monkeypatch.setattr(reference_cache, "decode_rows", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    options = {"rounds": 2, "speed_prompts": 2, "progress": False, "timed": ("static",), "hf": False}
    first = run_policies(model, tokenizer, ids, settings, 4, **options).summary.set_index("label")
    assert first.loc["static@2"].speedup_vs_full > 0 and first.loc["static@2"].n_speed_prompts == 2
    assert math.isnan(first.loc["calm"].speedup_vs_full) and first.loc["calm"].n_speed_prompts == 0
    assert first.loc["calm"].n_prompts == 3  # quality covers every prompt all the same
    again = run_policies(model, tokenizer, ids, settings, 4, **options)
    assert len(calls) == 1  # the second run read the full-depth outputs back
    assert again.summary.set_index("label").loc["calm"].rougeL_vs_full == first.loc["calm"].rougeL_vs_full
    with pytest.raises(ValueError, match="match no setting"):
        run_policies(model, tokenizer, ids, settings, 4, **{**options, "timed": ("nothing",)})


def test_quality_only_runs_time_nothing_and_lightest_keeping_times_the_chosen_setting(tiny, tmp_path, monkeypatch):
    from effllm.experiments.runs import lightest_keeping

    model, tokenizer = tiny
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    ids = [torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 6)]
    # static@4 of 4 layers is the full model (quality 1 at 4 layers); static@1 reads layer 1 (quality below 1)
    settings = {"static@1": StaticExit(1), "static@4": StaticExit(4), "calm": Calm(threshold=0.5, candidate_layer=1)}
    quality_only = run_policies(model, tokenizer, ids, settings, 4, speed_prompts=0, progress=False)
    assert quality_only.timings.empty and "hf_generate" not in set(quality_only.items.label)
    assert (quality_only.summary.n_speed_prompts == 0).all() and (quality_only.summary.n_prompts == 3).all()
    summary = quality_only.summary.set_index("label")
    chosen = lightest_keeping(1.0)(quality_only.summary)
    # per method, the fewest layers among the settings whose interval's low end reaches the bar; none for a
    # method that never reaches it
    static_keep = summary[(summary.method == "static") & (summary.rougeL_vs_full_ci_low >= 1.0)]
    assert [c for c in chosen if c.startswith("static")] == [static_keep.avg_layers.idxmin()]
    assert ("calm" in chosen) == bool(summary.loc["calm"].rougeL_vs_full_ci_low >= 1.0)
    run = run_policies(model, tokenizer, ids, settings, 4, speed_prompts=2, rounds=2, hf=False, progress=False,
                       timed=lightest_keeping(1.0))
    assert set(run.timings.label) == {"full", *chosen}
    without_full = run_policies(model, tokenizer, ids, settings, 4, speed_prompts=2, rounds=2, hf=False,
                                progress=False, timed=("static@1",), time_full=False)
    assert set(without_full.timings.label) == {"static@1"}
    assert math.isnan(without_full.summary.set_index("label").loc["static@1"].speedup_vs_full)
    with pytest.raises(ValueError, match="bar"):
        lightest_keeping(1.5)


def test_one_rule_names_the_timed_labels_for_runs_and_frontier_tables():
    from effllm.decoding import Calm, Full, StaticExit
    from effllm.experiments.runs import _timed_settings, names_label

    assert names_label("CALM 0.9", ["CALM"]) and names_label("CALM 0.9", ["*0.9"]) and names_label("x", None)
    assert not names_label("CALM 0.9 + vocab", ["CALM", "!* + *"]) and names_label("CALM 0.9", ["CALM", "!* + *"])
    policies = {"full": Full(), "static@2": StaticExit(2), "CALM 0.9": Calm("softmax", 0.9, 1),
                "CALM 0.9 + vocab": Calm("softmax", 0.9, 1)}
    assert list(_timed_settings(policies, ("CALM", "!* + *"))) == ["full", "CALM 0.9"]
    with pytest.raises(ValueError, match=r"\['FREE'\] match no setting"):
        _timed_settings(policies, ("FREE",))
