"""The pruning benchmark's bookkeeping on a tiny model (speed is not asserted: these machines are noisy)."""

import json
import re

import pytest

from effllm import bench


def test_prune_benchmark_writes_one_row_per_method_and_pattern(tmp_path, capsys):
    out = tmp_path / "prune.json"
    assert bench.main(["prune", "--model", "tiny-llama", "--samples", "3", "--seq-len", "16", "--batch-size", "2",
                       "--eval-windows", "2", "--patterns", "unstructured,2:4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-llama" and result["samples"] == 3 and result["seq_len"] == 16
    rows = result["rows"]
    assert [(r["method"], r["pattern"]) for r in rows] == [("dense", None)] + [
        (m, p) for p in ("unstructured", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
    forward = result["forward_seconds"]
    assert forward > 0 and all(r["forward_seconds"] == forward for r in rows)
    for row in rows[1:]:
        assert row["ratio_to_forward"] == pytest.approx(row["seconds"] / forward)
        assert row["sparsity"] == pytest.approx(0.5)
        assert row["peak_rss_mb"] >= row["extra_rss_mb"] >= 0
        assert row["ppl_prose"] > 1
    assert rows[0]["sparsity"] == 0 and rows[0]["ppl_prose"] > 1
    assert set(result["goal"]["met"]) == {"unstructured", "2:4"}
    assert result["goal"]["met"]["2:4"] == (rows[5]["ratio_to_forward"] <= result["goal"]["wanda_ratio_to_forward_at_most"])
    assert "ratio_to_forward" in capsys.readouterr().out


@pytest.mark.parametrize(("arguments", "message"), [
    (["--methods", "obs"], "--methods must name some of magnitude, wanda, sparsegpt"),
    (["--patterns", "2-4"], "Cannot parse pattern '2-4'"),
    (["--sparsity", "1.0"], "--sparsity must be in \\[0, 1\\)"),
    (["--samples", "0"], "must be >= 1"),
])
def test_prune_benchmark_rejects_bad_arguments(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["prune", "--model", "tiny-llama", *arguments])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
