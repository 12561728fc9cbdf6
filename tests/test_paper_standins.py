"""The `paper` profile end to end, offline: every notebook in the paper-standins profile (the paper profile's
models, data set names, layer indices and code paths, every hub id answered by its stand-in, smoke sizes)
runs to the end, publishes its figures and report, and has no error output."""

from __future__ import annotations

import json

import nbformat
import pytest

from effllm import runner
from effllm.runner.executors import LocalExecutor

NOTEBOOKS = runner.discover_notebooks(runner.REPO_ROOT / "notebooks")


@pytest.mark.notebook
def test_every_notebook_runs_in_the_paper_standins_profile(tmp_path, capsys):
    jobs, warnings = runner.build_jobs(NOTEBOOKS, "paper-standins", tmp_path / "build", timeout=600)
    assert warnings == []
    assert all(job.env["EFFLLM_STANDINS"] == "1" and job.env["HF_HUB_OFFLINE"] == "1" for job in jobs)
    # Two at a time: CI has 2 cores and every kernel of this profile runs one intra-op thread (OMP_NUM_THREADS).
    results = runner.run(jobs, LocalExecutor(2))
    table = runner.format_summary(results)
    with capsys.disabled():  # the per-notebook seconds, for the CI log (this is CI's budget to watch)
        print(f"\npaper-standins:\n{table}")
    failed = {r.notebook: r.error for r in results if r.status != "ok"}
    assert not failed, f"paper-standins notebooks failed: {json.dumps(failed, indent=1)}"
    for job, result in zip(jobs, results, strict=True):
        assert result.figures and job.publish_dir.is_relative_to(tmp_path)  # never figures/ or figures/paper/
        executed = nbformat.read(result.executed, as_version=4)
        assert executed.metadata.papermill.parameters["model_name"] == job.parameters["model_name"]
        errors = [o.ename for cell in executed.cells for o in cell.get("outputs", []) if o.output_type == "error"]
        assert errors == [], f"{job.name}: error outputs in the executed copy: {errors}"


def test_chat_input_ids_of_a_base_model_is_the_plain_message(monkeypatch):
    """Notebook 00 chats with the paper profile's Llama-3.2-1B, a base model whose tokenizer has no chat
    template (its stand-in's neither): the plain message with BOS, not a ValueError from transformers."""
    from effllm import standins
    from effllm.models import chat_input_ids, load_model

    monkeypatch.setenv(standins.ENV_VAR, "1")
    _, base = load_model("meta-llama/Llama-3.2-1B")
    assert base.chat_template is None
    ids = chat_input_ids(base, "What is 2 + 2?")
    assert ids.tolist() == base("What is 2 + 2?", return_tensors="pt")["input_ids"].tolist()
    assert ids[0, 0] == 128000  # <|begin_of_text|>
    _, chat = load_model("google/gemma-1.1-7b-it")  # a chat model keeps its template
    assert chat.decode(chat_input_ids(chat, "Hi")[0]).startswith("<bos><start_of_turn>user\nHi<end_of_turn>")
