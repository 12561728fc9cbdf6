"""tools/gpu_check.sh, the GPU check, on a machine without a GPU: its arguments, the commands it would run
(--dry-run), and the same commands on a CPU with tiny sizes; tools/bench_on_device.py puts a benchmark's model
and prompts on the device it is given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm.runner import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(REPO_ROOT / "tools"))
import bench_on_device  # noqa: E402  (tools/ is not a package)


def gpu_check(*args: str, out: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "OUT"} | env
    if out is not None:
        environment["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment,
                          timeout=600)


def test_dry_run_prints_the_set_up_and_the_four_gpu_benchmarks(tmp_path):
    result = gpu_check("--dry-run", out=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    benches = [line for line in commands if line.startswith("timeout ")]
    results = tmp_path / "results"
    assert [line.split("--out ")[1] for line in benches] == [
        f"{results}/sparse_codellama-13b_cuda.json", f"{results}/sparse_smollm2-135m_cuda.json",
        f"{results}/early_exit_smollm2-135m_bfloat16_cuda.json", f"{results}/early_exit_gemma3-270m_bfloat16_cuda.json"]
    assert all("--device cuda" in line for line in benches)
    assert "--shapes codellama-13b --tokens 1,16,2048" in benches[0] and "--shapes model --model smollm2-135m" in benches[1]
    assert all("tools/bench_on_device.py --device cuda early-exit" in b and "--dtype bfloat16" in b for b in benches[2:])
    if not (REPO_ROOT / ".venv" / "bin" / "python").exists():  # a bare clone: it sets itself up first
        assert "make setup PYTHON=python3" in commands and any("--system-site-packages" in c for c in commands)
    assert not results.exists()  # a dry run writes nothing


def test_options_reach_the_commands(tmp_path):
    result = gpu_check("--dry-run", "--python", "/opt/py", "--out", str(tmp_path / "o"), "--models", "a b c",
                       "--dtype", "float16", "--device", "cuda:1", "--steps", "early-exit")
    assert result.returncode == 0, result.stderr
    benches = [line for line in result.stdout.splitlines() if line.startswith("timeout ")]
    assert len(benches) == 3 and all(line.startswith("timeout 150 /opt/py tools/bench_on_device.py --device cuda:1")
                                     for line in benches)
    assert benches[2].endswith(f"{tmp_path}/o/results/early_exit_c_float16_cuda.json")
    assert "# none: /opt/py" in result.stdout  # --python: no set-up


@pytest.mark.parametrize(("args", "expected"), [
    (["--device", "tpu"], "--device must be cuda, cuda:N or cpu; got 'tpu'"),
    (["--dtype", "int8"], "--dtype must be float32, bfloat16 or float16; got 'int8'"),
    (["--steps", "sparse,early-exit"], "--steps: unknown step 'sparse'; steps: sparse-codellama,sparse-model"),
    (["--models", " "], "--models is empty"),
    (["--out"], "--out needs a folder"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--python", "/no/such/python"], "--python '/no/such/python' is not an interpreter here"),
    (["--wheelhouse", "/no/such/folder", "--dry-run"], "--wheelhouse '/no/such/folder' is not a folder"),
])
def test_bad_arguments_exit_2_and_say_what_is_allowed(args, expected):
    result = gpu_check(*args)
    assert result.returncode == 2 and expected in result.stderr and "--help" in result.stderr


def test_without_a_gpu_it_stops_with_exit_2_before_measuring(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the check would run")
    result = gpu_check("--python", sys.executable, "--steps", "sparse-model", out=tmp_path)
    assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr and "--device cpu --tiny" in result.stderr
    assert not list((tmp_path / "results").glob("*.json"))


def test_the_script_runs_its_commands_on_a_cpu_with_tiny_sizes(tmp_path):
    """The script's own run on a CPU: early-exit in bfloat16 through bench_on_device, its JSON where the GPU run
    puts it, and the step record. (The sparse and early-exit benchmarks themselves are tested on tiny models in
    test_sparse.py and test_bench.py; the CodeLlama-13B shapes take a minute on a CPU: in the dry run above.)"""
    result = gpu_check("--device", "cpu", "--tiny", "--models", "tiny-llama", "--python", sys.executable,
                       "--steps", "early-exit", out=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["device"] == "cpu" and summary["tiny"] is True
    (step,) = summary["steps"]
    assert step["step"] == "early_exit_tiny-llama" and step["status"] == "ok" and step["exit_code"] == 0
    early = json.loads((tmp_path / "results" / "early_exit_tiny-llama_bfloat16_cpu.json").read_text())
    assert early["model"] == "tiny-llama" and early["dtype"] == "bfloat16"
    assert {"hf_generate", "full"} <= {row["label"] for row in early["rows"]}
    assert "early_exit_tiny-llama" in (tmp_path / "gpu_check.log").read_text()


def test_bench_on_device_moves_the_model_and_the_prompts(monkeypatch):
    """On the `meta` device, as a stand-in for cuda: every load_model without a device of its own and every
    task_prompts lands there, through the names a benchmark imports inside its run()."""
    import effllm.models
    from effllm.experiments import prompts

    monkeypatch.setattr(effllm.models, "load_model", effllm.models.load_model)
    monkeypatch.setattr(prompts, "task_prompts", prompts.task_prompts)
    bench_on_device.place_on("meta")
    from effllm.experiments.prompts import task_prompts
    from effllm.models import load_model

    model, tokenizer = load_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.input_ids.device.type for p in task_prompts(tokenizer, "builtin", 2, fmt="plain")} == {"meta"}
    own, _ = load_model("tiny-llama", device="cpu")  # a device the caller names wins
    assert {p.device.type for p in own.parameters()} == {"cpu"}


def test_bench_on_device_refuses_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the refusal for a missing GPU cannot be provoked here")
    with pytest.raises(SystemExit) as exit_info:
        bench_on_device.main(["--device", "cuda", "early-exit", "--model", "tiny-llama"])
    assert exit_info.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err
