"""The early-exit benchmark's bookkeeping on a tiny model (speed numbers are not asserted: noisy)."""

import json

import pytest
import torch

from effllm import bench, exits
from effllm.bench import early_exit
from effllm.models import load_model, tiny_model


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))  # the fitted tiny exits stay out of the user cache
    return tmp_path


def test_early_exit_benchmark_writes_rows(private_cache, capsys):
    out = private_cache / "ee.json"
    assert bench.main(["early-exit", "--model", "tiny-llama", "--prompts", "2", "--max-new-tokens", "5",
                       "--k", "32", "--calibration-prompts", "3", "--calibration-tokens", "3",
                       "--ltt-delta", "0.9", "--ltt-epsilon", "0.5", "--no-fitted-exits", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fitted_exits"] is False
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows)[:2] == ["hf_generate", "full"]
    assert rows["hf_generate"]["speedup_vs_hf"] == 1.0
    assert rows["hf_generate"]["confidence_flops_per_token"] is None
    assert rows["hf_generate"]["confidence_ms_per_token"] is None
    # the full-depth engine's row is the reference itself (ROUGE is not asserted: the byte-level tiny
    # tokenizer decodes random ids to symbols that rouge-score's tokenizer drops)
    assert rows["full"]["token_agreement_vs_full"] == 1.0
    assert rows["full"]["avg_layers"] == 4.0
    assert rows["full"]["confidence_flops_per_token"] == 0.0  # no exit decision at full depth
    assert rows["static@2"]["avg_layers"] < 4.0  # first token from the prompt pass at static depth 2
    expected = {"calm-softmax", "calm-state", "free@2", "calm-softmax-fixed32", "calm-softmax-decaying32",
                "calm-softmax-adaptive32", "free@2-fixed32", "skip@1/4", "skip@2/4"}
    assert expected <= set(rows)
    assert rows["calm-softmax-fixed32"]["params"]["type_vocab_reduct"] == "fixed"
    n_rows = len(result["rows"])
    # every engine row decodes prompts x tokens; the bookkeeping columns exist on every row
    for row in result["rows"]:
        assert set(early_exit.COLUMNS) <= set(row)
        assert row["tokens_per_s"] > 0
        if row["method"] != "hf_generate":
            assert row["confidence_flops_per_token"] >= 0 and row["confidence_ms_per_token"] >= 0
            assert 0 <= row["token_agreement_vs_full"] <= 1
    # tiny-llama: d = 64, V = 384. CALM softmax from layer 2 of 4 checks layers 2 and 3 of every new token
    # but the first (prompt pass): (2d - 1) V FLOPs per check, averaged over the 5 tokens
    calm = [r for r in result["rows"] if r["method"] == "calm-softmax" and r["threshold"] == 0.9][0]
    per_check = exits.head_flops(64, 384)
    assert calm["confidence_flops_per_token"] <= 2 * per_check * 4 / 5 + 1e-9
    assert calm["confidence_flops_per_token"] >= per_check * 4 / 5 - 1e-9  # at least one check per token
    # fixed-k pruning: one full check at layer 2, then k = 32 rows; never more than the unpruned check
    fixed = rows["calm-softmax-fixed32"]
    assert fixed["confidence_flops_per_token"] <= (per_check + exits.head_flops(64, 32)) * 4 / 5 + 1e-9
    # Learn-then-Test ran on separate prompts with the requested risk level
    calibration = result["calibration"]
    assert calibration["n"] == 3 and calibration["delta"] == 0.9 and calibration["max_new_tokens"] == 3
    assert [r["candidate"] for r in calibration["table"]] == sorted(early_exit.LTT_CANDIDATES, reverse=True)
    if calibration["threshold"] is not None:
        assert rows["calm-softmax-ltt"]["threshold"] == calibration["threshold"]
    assert n_rows == 2 + len(early_exit.default_early_exit_settings(4, k=32)) + (calibration["threshold"] is not None)
    check = {c["k"]: c for c in result["confidence_check"]}
    assert check[384]["flops"] == per_check and check[32]["flops"] == exits.head_flops(64, 32)
    # the weight-read floor reads every decoder linear and the LM head once, in float32
    floor = result["weight_read_floor"]
    model, _ = load_model("tiny-llama")
    expected_bytes = 4 * sum(m.weight.numel() for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear))
    assert floor["bytes_per_token"] == expected_bytes
    assert floor["ms_per_token"] > 0
    assert floor["max_full_depth_speedup_vs_hf"] == pytest.approx(floor["tokens_per_s"] / rows["hf_generate"]["tokens_per_s"])
    assert "speedup_vs_hf" in capsys.readouterr().out


def test_methods_filter_keeps_the_references_and_matching_rows(private_cache):
    out = private_cache / "ee.json"
    assert bench.main(["early-exit", "--model", "tiny-llama", "--prompts", "1", "--max-new-tokens", "3",
                       "--methods", "static,free@*-fixed*", "--no-fitted-exits", "--out", str(out)]) == 0
    labels = [row["method"] for row in json.loads(out.read_text())["rows"]]
    assert labels == ["hf_generate", "full", "static@2", "static@2", "free@2-fixed256"]
    assert "calibration" not in json.loads(out.read_text())  # the LTT row was not selected


def test_methods_filter_rejects_unknown_patterns(private_cache, capsys):
    with pytest.raises(SystemExit):
        bench.main(["early-exit", "--model", "tiny-llama", "--methods", "medusa", "--prompts", "1"])
    err = capsys.readouterr().err
    assert "medusa" in err and "calm-softmax" in err


def test_bench_prompts_alternate_tasks_and_offsets_are_disjoint():
    _, tokenizer = tiny_model("llama")
    first = early_exit.bench_prompts(tokenizer, 4, fmt="plain")
    shifted = early_exit.bench_prompts(tokenizer, 4, offset=4, fmt="plain")
    overlap = early_exit.bench_prompts(tokenizer, 6, offset=2, fmt="plain")
    assert [torch.equal(a, b) for a, b in zip(first[2:], overlap[:2], strict=True)] == [True, True]
    assert not any(torch.equal(a, b) for a in first for b in shifted)
    texts = [tokenizer.decode(p[0]) for p in first]
    assert texts[0].startswith("Question:") and "def " in texts[1] and texts[2].startswith("Question:")
    with pytest.raises(ValueError, match="allowed: builtin"):
        early_exit.task_prompts(tokenizer, "wikitext", 1)
