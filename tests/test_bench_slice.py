"""The slicing benchmark's bookkeeping on a tiny model (speed numbers are not asserted: noisy)."""

import json

import pytest

from effllm import bench
from effllm.models import tiny_model
from effllm.slicing import equal_parameter_shortgpt_layers, shortgpt_parameter_count, sliced_parameter_count


def test_slice_benchmark_writes_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))  # built data stays out of the user cache
    out = tmp_path / "slice.json"
    assert bench.main(["slice", "--model", "tiny-llama", "--mean", "0.5", "--amplitude", "0.2", "--samples", "4",
                       "--seq-len", "32", "--eval-windows", "2", "--prompt-len", "8", "--new-tokens", "3",
                       "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "slicegpt-constant", "slicegpt-dynamic", "shortgpt-equal-params",
                          "shortgpt-mean-layers"]
    dense_model, _ = tiny_model("llama")
    dense = rows["dense"]
    assert dense["parameters"] == sum(p.numel() for p in dense_model.parameters())
    assert dense["params_ratio"] == dense["ppl_ratio"] == dense["prefill_speedup"] == dense["decode_speedup"] == 1.0
    assert dense["slice_s"] is None and dense["layers"] == 4
    # sizes agree with the parameter formulas, computed here from the dense model
    assert rows["slicegpt-constant"]["parameters"] == sliced_parameter_count(dense_model, [0.5] * 4)
    assert rows["slicegpt-constant"]["dims"] == [32] * 4
    dynamic_dims = rows["slicegpt-dynamic"]["dims"]
    assert dynamic_dims != [32] * 4 and sum(dynamic_dims) == pytest.approx(4 * 32, abs=2)  # mean 0.5, rounded
    n_equal = equal_parameter_shortgpt_layers(dense_model, mean=0.5)
    assert rows["shortgpt-equal-params"]["layers"] == 4 - n_equal
    assert rows["shortgpt-equal-params"]["parameters"] == shortgpt_parameter_count(dense_model, n_equal)
    assert rows["shortgpt-mean-layers"]["layers"] == 2 and len(rows["shortgpt-mean-layers"]["removed_layers"]) == 2
    for row in result["rows"]:
        assert row["params_ratio"] == row["parameters"] / dense["parameters"]
        assert row["ppl_ratio"] == pytest.approx(row["perplexity"] / dense["perplexity"])
        assert row["perplexity"] > 1 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
        if row["variant"] != "dense":
            assert row["slice_s"] > 0
            assert row["slice_vs_forward"] == pytest.approx(row["slice_s"] / result["dense_forward_s"])
    assert result["calibration"]["tokens"] == 4 * 32 and result["evaluation"]["split"] == "test"
    assert "decode_speedup" in capsys.readouterr().out


def test_slice_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["slice", "--model", "tiny-llama", "--mean", "1.0"])
    assert exit_info.value.code == 2
    assert "--mean must be in (0, 1); got 1.0" in capsys.readouterr().err
