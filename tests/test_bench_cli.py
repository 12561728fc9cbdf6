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


def test_results_are_written_atomically(tmp_path):
    out = bench.write_result({"rows": [1, 2]}, tmp_path / "r.json", "unused.json")
    assert json.loads(out.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left beside it
