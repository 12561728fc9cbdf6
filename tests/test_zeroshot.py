"""Zero-shot multiple choice through lm-eval: its accuracy equals a direct log-likelihood comparison,
it runs on any module with the HF causal-LM call signature, and it leaves the model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from effllm import data, standins, zeroshot
from effllm.models import tiny_model

LIMIT = 12


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub: anything that tries to reach it fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama")


def brute_force(model, tokenizer, task, limit):
    """(accuracy, accuracy_norm) from log p(" " + choice | prompt) summed over the choice's tokens, computed
    one sequence at a time: the prompt and prompt + continuation are tokenized whole, without special
    tokens, and the continuation is what the longer one adds."""
    config = zeroshot.task_config(task)
    template = config["doc_to_text"]
    correct = correct_norm = 0
    records = zeroshot.task_records(task)[:limit]
    for record in records:
        prompt = template.replace("{{question}}", record.get("question", "")).replace("{{context}}",
                                                                                      record.get("context", ""))
        scores, scores_norm = [], []
        for choice in record["choices"]:
            continuation = " " + choice
            context_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            total = sum(float(log_probs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole)))
            scores.append(total)
            scores_norm.append(total / len(choice))  # lm-eval: characters of the choice, no delimiter
        correct += max(range(len(scores)), key=scores.__getitem__) == record["label"]
        correct_norm += max(range(len(scores)), key=scores_norm.__getitem__) == record["label"]
    return correct / len(records), correct_norm / len(records)


@pytest.mark.parametrize("task", zeroshot.TASKS)
def test_accuracy_equals_brute_force_log_likelihood(model_and_tokenizer, task):
    model, tokenizer = model_and_tokenizer
    result = zeroshot.zero_shot_accuracy(model, tokenizer, task, limit=LIMIT, batch_size=4)
    accuracy, accuracy_norm = brute_force(model, tokenizer, task, LIMIT)
    assert result["task"] == task and result["n"] == LIMIT and result["choices"] == 4
    assert result["chance"] == pytest.approx(0.25)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["accuracy_norm"] == pytest.approx(accuracy_norm)


class BareCausalLM(nn.Module):
    """A module with only the HF causal-LM call signature: no config, no device, no tie_weights."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_runs_on_a_bare_module_and_leaves_the_model_untouched(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()  # the training flag must come back
    before = {name: value.clone() for name, value in model.state_dict().items()}
    bare = BareCausalLM(model)
    result = zeroshot.zero_shot_accuracy(bare, tokenizer, "prose-mc", limit=LIMIT)
    assert model.training and bare.training
    model.eval()
    assert result["accuracy"] == pytest.approx(brute_force(model, tokenizer, "prose-mc", LIMIT)[0])
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_task_config_reads_local_jsonl():
    config = zeroshot.task_config("arithmetic-mc")
    path = config["dataset_kwargs"]["data_files"]["test"]
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == len(zeroshot.task_records("arithmetic-mc"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"task": "trivia-mc"}, ValueError, "Unknown zero-shot task 'trivia-mc'.*arithmetic-mc, prose-mc.*hellaswag"),
        ({"task": "hellaswag"}, data.DataNotAvailableError, "'hellaswag' is lm-eval's, on hub data.*prose-mc"),
        ({"limit": 0}, ValueError, "limit must be a positive number.*0"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer.*0"),
        ({"tokenizer": None}, ValueError, "Pass the model's tokenizer"),
        ({"model": "gpt2"}, TypeError, "nn.Module.*str"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(model_and_tokenizer, kwargs, error, message):
    model, tokenizer = model_and_tokenizer
    arguments = {"model": model, "tokenizer": tokenizer, "task": "prose-mc", **kwargs}
    with pytest.raises(error, match=message):
        zeroshot.zero_shot_accuracy(**arguments)


# --------------------------------------------------------------------------------------------------
# Per-item outcomes and lm-eval's hub tasks on stand-in data


@pytest.mark.parametrize("task", zeroshot.TASKS)
def test_items_are_the_per_item_outcomes_behind_the_accuracy(model_and_tokenizer, task):
    model, tokenizer = model_and_tokenizer
    result = zeroshot.zero_shot_accuracy(model, tokenizer, task, limit=LIMIT, batch_size=4)
    items = result["items"]
    assert [i["item"] for i in items] == list(range(LIMIT))
    assert all(i["correct"] in (0, 1) and i["correct_norm"] in (0, 1) for i in items)
    assert sum(i["correct"] for i in items) / LIMIT == pytest.approx(result["accuracy"])
    assert sum(i["correct_norm"] for i in items) / LIMIT == pytest.approx(result["accuracy_norm"])


def test_every_hub_task_has_its_lm_eval_task_file():
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    assert set(zeroshot.LM_EVAL_TASK_FILES) == set(zeroshot.HUB_TASKS)
    for relative, hub_name, split in zeroshot.LM_EVAL_TASK_FILES.values():
        assert (root / relative).is_file() and hub_name in data.HUB and split in data.HUB[hub_name].splits
    # seed 004's suite is among them
    assert {"hellaswag", "winogrande", "arc_easy", "arc_challenge", "piqa", "mmlu"} <= set(zeroshot.HUB_TASKS)


@pytest.mark.parametrize("task", zeroshot.HUB_TASKS)
def test_hub_tasks_run_on_standin_data_offline(model_and_tokenizer, task):
    model, tokenizer = model_and_tokenizer
    with standins.active():
        result = zeroshot.zero_shot_accuracy(model, tokenizer, task, limit=4, batch_size=4)
    assert result["task"] == task and result["n"] == 4 and len(result["items"]) == 4
    assert sum(i["correct"] for i in result["items"]) / 4 == pytest.approx(result["accuracy"])
    config = zeroshot.standin_task_config(task)
    assert config["dataset_path"] == "json" and config["num_fewshot"] == 0
    assert {k: v for k, v in config.items() if k.endswith("_split") and v} in (
        {"validation_split": "validation"}, {"test_split": "test"})


def test_standin_arc_equals_brute_force_log_likelihood(model_and_tokenizer):
    """lm-eval's own ARC prompt on the stand-in rows: "Question: ...\\nAnswer:" and " " + each choice's text."""
    model, tokenizer = model_and_tokenizer
    with standins.active():
        result = zeroshot.zero_shot_accuracy(model, tokenizer, "arc_easy", limit=6, batch_size=2)
        rows = data.load("arc_easy", "test").to_list()[:6]
    for row, item in zip(rows, result["items"], strict=True):
        prompt = f"Question: {row['question']}\nAnswer:"
        context_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for text in row["choices"]["text"]:
            whole = tokenizer(prompt + " " + text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(float(log_probs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
        label = row["choices"]["label"].index(row["answerKey"])
        assert item["correct"] == int(max(range(len(scores)), key=scores.__getitem__) == label)


def test_standin_boolq_reads_the_answer_as_label():
    with standins.active():
        config = zeroshot.standin_task_config("boolq")
        rows = data.load("boolq", "validation").to_list()
    path = config["dataset_kwargs"]["data_files"]["validation"]
    written = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [r["label"] for r in written] == [int(r["answer"]) for r in rows]


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_prefix_sharing_gives_lm_evals_own_scores(family):
    """One pass per context plus a KV cache scores every choice as lm-eval's HF path does, one pass per choice."""
    model, tokenizer = tiny_model(family)
    shared = zeroshot.zero_shot_accuracy(model, tokenizer, "prose-mc", limit=LIMIT, batch_size=4)
    plain = zeroshot.zero_shot_accuracy(model, tokenizer, "prose-mc", limit=LIMIT, batch_size=4, prefix_sharing=False)
    assert shared["items"] == plain["items"]


def test_prefix_sharing_on_a_sliced_model():
    from effllm.slicing import slice_model

    model, tokenizer = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    slice_model(model, ids, mean=0.3, amplitude=0.1)
    shared = zeroshot.zero_shot_accuracy(model, tokenizer, "arithmetic-mc", limit=LIMIT, batch_size=4)
    plain = zeroshot.zero_shot_accuracy(model, tokenizer, "arithmetic-mc", limit=LIMIT, prefix_sharing=False)
    assert shared["items"] == plain["items"]
