"""The early-exit benchmark's bookkeeping on a tiny model (speed numbers are not asserted: noisy)."""

import json

import pytest
import torch

from effllm import bench, exits
from effllm.bench import early_exit
from effllm.experiments import prompts
from effllm.models import load_model, tiny_model


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))  # the fitted tiny exits stay out of the user cache
    return tmp_path


def test_early_exit_benchmark_writes_rows(private_cache, capsys):
    out = private_cache / "ee.json"
    assert bench.main(["early-exit", "--model", "tiny-llama", "--prompts", "2", "--max-new-tokens", "5",
                       "--k", "32", "--calibration-prompts", "3", "--calibration-tokens", "3", "--rounds", "2",
                       "--ltt-delta", "0.9", "--ltt-epsilon", "0.5", "--no-fitted-exits", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fitted_exits"] is False and result["dtype"] == "float32" and result["rounds"] == 2
    assert result["decoded_to"] == "eos" and result["batch_size"] == 16
    rows = {row["label"]: row for row in result["rows"]}
    assert list(rows)[:2] == ["hf_generate", "full"]
    assert rows["hf_generate"]["method"] == "hf" and rows["full"]["method"] == "full"
    assert rows["hf_generate"]["speedup_vs_hf"] == 1.0
    assert rows["hf_generate"]["confidence_flops_per_token"] is None  # no NaN in the JSON: null
    # the full-depth engine's row is the quality reference itself, and HF generate gives the same tokens
    assert rows["full"]["token_agreement_vs_full"] == 1.0 and rows["full"]["identical_to_full"] == 1.0
    assert rows["hf_generate"]["identical_to_full"] == 1.0
    assert rows["full"]["avg_layers"] == 4.0
    assert rows["full"]["confidence_flops_per_token"] == 0.0  # no exit decision at full depth
    assert rows["static@2"]["avg_layers"] == 2.0  # the prompt and every token at static depth 2
    expected = {"calm-softmax 0.9", "calm-state 0.99", "free@2 0.9", "calm-softmax-fixed32 0.9",
                "calm-softmax-decaying32 0.9", "calm-softmax-adaptive32 0.9", "free@2-fixed32 0.9",
                "free@2-adaptive", "self-spec@1x4", "self-spec@2x4", "skip@1/4", "skip@2/4"}
    assert expected <= set(rows)
    # method is the family, every parameter its own column
    assert rows["calm-softmax-fixed32 0.9"]["method"] == "calm"
    assert rows["calm-softmax-fixed32 0.9"]["type_vocab_reduct"] == "fixed" and rows["calm-softmax-fixed32 0.9"]["k"] == 32
    assert rows["calm-softmax 0.9"]["threshold"] == 0.9
    assert rows["free@2 0.7"]["threshold"] == 0.7 and rows["free@2 0.7"]["shallow_exit_layer"] == 2
    # self-speculation is lossless: identical to the full-depth output, with an acceptance rate
    for label in ("self-spec@1x4", "self-spec@2x4"):
        assert rows[label]["identical_to_full"] == 1.0 and 0.0 <= rows[label]["acceptance_rate"] <= 1.0
    for row in result["rows"]:
        assert set(early_exit.COLUMNS) - {"acceptance_rate", "threshold"} <= set(row)
        # to the end of sequence: at most 5 tokens per prompt; the paired ratio inside its interval over prompts
        assert row["tokens_per_s"] > 0 and 2 <= row["new_tokens"] <= 10 and row["decoded_to"] == "eos"
        assert row["n_prompts"] == (2 if row["method"] != "hf" else row["n_speed_prompts"])
        assert row["speedup_vs_hf_ci_low"] <= row["speedup_vs_hf"] <= row["speedup_vs_hf_ci_high"]
        assert row["n_speed_prompts"] == 2 and row["rounds"] == 2 and "speedup_vs_hf_min" not in row
        if row["method"] != "hf":
            assert row["confidence_flops_per_token"] >= 0 and row["confidence_ms_per_token"] >= 0
            assert 0 <= row["token_agreement_vs_full"] <= 1
            assert row["rougeL_vs_full_ci_low"] <= row["rougeL_vs_full"] <= row["rougeL_vs_full_ci_high"]
    # tiny-llama: d = 64, V = 384. CALM softmax from layer 2 of 4 checks layers 2 and 3 of every new token, the
    # first (from the prompt pass) included as in the authors' code: (2d - 1) V FLOPs per check, over the 5 tokens
    calm = rows["calm-softmax 0.9"]
    per_check = exits.head_flops(64, 384)
    assert calm["confidence_flops_per_token"] <= 2 * per_check + 1e-9
    assert calm["confidence_flops_per_token"] >= per_check - 1e-9  # at least one check per token
    # fixed-k pruning: one full check at layer 2, then k = 32 rows; never more than the unpruned check
    fixed = rows["calm-softmax-fixed32 0.9"]
    assert fixed["confidence_flops_per_token"] <= per_check + exits.head_flops(64, 32) + 1e-9
    # Learn-then-Test ran on separate prompts with the requested risk level
    calibration = result["calibration"]
    assert calibration["n"] == 3 and calibration["delta"] == 0.9 and calibration["max_new_tokens"] == 3
    assert [r["candidate"] for r in calibration["table"]] == sorted(early_exit.LTT_CANDIDATES, reverse=True)
    if calibration["threshold"] is not None:
        assert rows["calm-softmax-ltt"]["threshold"] == calibration["threshold"]
    n_rows = len(result["rows"])
    assert n_rows == 2 + len(early_exit.default_settings(4, k=32)) + (calibration["threshold"] is not None)
    check = {c["k"]: c for c in result["confidence_check"]}
    assert check[384]["flops"] == per_check and check[32]["flops"] == exits.head_flops(64, 32)
    # the weight-read floor reads every decoder linear and the LM head once, in each dtype
    floor = result["weight_read_floor"]
    model, _ = load_model("tiny-llama")
    weights = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert floor["float32"]["bytes_per_token"] == 4 * weights and floor["bfloat16"]["bytes_per_token"] == 2 * weights
    assert floor["float32"]["ms_per_token"] > 0
    assert floor["float32"]["max_full_depth_speedup_vs_hf"] == pytest.approx(
        floor["float32"]["tokens_per_s"] / rows["hf_generate"]["tokens_per_s"])
    assert floor["float32"]["full_engine_fraction_of_floor"] == pytest.approx(
        rows["full"]["tokens_per_s"] / floor["float32"]["tokens_per_s"])
    out = capsys.readouterr().out
    assert "speedup_vs_hf" in out and "decoded to the end of sequence (at most 5 tokens)" in out


def test_methods_filter_keeps_the_references_and_matching_rows(private_cache, capsys):
    out = private_cache / "ee.json"
    assert bench.main(["early-exit", "--model", "tiny-llama", "--prompts", "1", "--max-new-tokens", "3",
                       "--rounds", "1", "--methods", "static,free@*-fixed*", "--no-fitted-exits", "--fixed-length",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["hf_generate", "full", "static@2", "free@2-fixed256 0.9"]
    # fixed length is a micro-benchmark, and says so: in the JSON, in every row and in the table's title
    assert result["decoded_to"] == "fixed length (end of sequence ignored)"
    assert all(row["decoded_to"] == result["decoded_to"] and row["new_tokens"] == 3 for row in result["rows"])
    assert "fixed length: exactly 3 tokens per prompt (end of sequence ignored)" in capsys.readouterr().out
    assert "calibration" not in json.loads(out.read_text())  # the LTT row was not selected


def test_methods_filter_rejects_unknown_patterns(private_cache, capsys):
    with pytest.raises(SystemExit):
        bench.main(["early-exit", "--model", "tiny-llama", "--methods", "medusa", "--prompts", "1"])
    err = capsys.readouterr().err
    assert "medusa" in err and "calm-softmax" in err


def test_builtin_prompts_alternate_tasks_and_offsets_are_disjoint():
    _, tokenizer = tiny_model("llama")
    first = prompts.task_prompts(tokenizer, "builtin", 4, fmt="plain")
    shifted = prompts.task_prompts(tokenizer, "builtin", 4, offset=4, fmt="plain")
    overlap = prompts.task_prompts(tokenizer, "builtin", 6, offset=2, fmt="plain")
    assert [torch.equal(a.input_ids, b.input_ids) for a, b in zip(first[2:], overlap[:2], strict=True)] == [True, True]
    assert not any(torch.equal(a.input_ids, b.input_ids) for a in first for b in shifted)
    texts = [tokenizer.decode(p.input_ids[0]) for p in first]
    assert texts[0].startswith("Question:") and "def " in texts[1] and texts[2].startswith("Question:")
    assert [p.task for p in first] == ["arithmetic", "humaneval"] * 2 and all(p.reference for p in first)
    with pytest.raises(ValueError, match="allowed: builtin"):
        prompts.task_prompts(tokenizer, "wikitext", 1)
