"""`python -m effllm.bench`: checks every benchmark shares, before any of them runs, and its result files."""

import json

import pytest

from effllm import bench


@pytest.mark.parametrize("out", ["/proc/effllm-results/x.json", "FOLDER"])
def test_unwritable_out_stops_before_any_benchmark_runs(out, tmp_path, monkeypatch, capsys):
    ran = []
    for module in bench.benchmarks().values():
        monkeypatch.setattr(module, "run", lambda args, name=module.NAME: ran.append(name) or 0)
    for name in bench.benchmarks():
        with pytest.raises(SystemExit) as stopped:
            bench.main([name, "--out", str(tmp_path) if out == "FOLDER" else out])
        assert stopped.value.code == 2
        assert "--out: " in capsys.readouterr().err
    assert ran == []


def test_results_are_written_atomically_and_stamped_with_the_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_DTYPE", "bfloat16")
    out = bench.write_result({"rows": [1, 2]}, tmp_path / "r.json", "unused.json")
    written = json.loads(out.read_text())
    assert written["rows"] == [1, 2]
    assert written["precision"]["dtype"] == "bfloat16" and written["precision"]["dtype_setting"] == "bfloat16"
    assert isinstance(written["precision"]["cpu_bfloat16"], bool) and written["precision"]["cpu_isa"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left beside it


def test_decode_profile_writes_its_groups_beside_the_floor(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert bench.main(["decode-profile", "--model", "tiny-llama", "--steps", "2", "--repeats", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-llama" and result["steps"] == 2 and result["weight_read_floor"]["ms_per_token"] > 0
    where = [row["where"] for row in result["rows"]]
    assert where[-2:] == ["whole step (profiled)", "weight-read floor (matmuls alone)"]
    assert set(where[:-2]) == set(result["groups"])
    assert "matmul (linear layers and head)" in capsys.readouterr().out
    cost = result["forward_cost"]["rows"]
    assert [row["tokens"] for row in cost] == [1, 2, 4, 8, 16] and cost[0]["x_one_token"] == 1.0
    assert all(row["ms"] > 0 for row in cost)
    with pytest.raises(SystemExit):
        bench.main(["decode-profile", "--model", "tiny-llama", "--steps", "0", "--out", str(out)])
    with pytest.raises(SystemExit):
        bench.main(["decode-profile", "--model", "tiny-llama", "--token-counts", "1,x", "--out", str(out)])
