"""Built-in data sets, calibration windows, hub-name errors and the arithmetic scorer."""

from __future__ import annotations

import re

import datasets
import pytest
import torch

from effllm import data, metrics
from effllm.models import tiny_tokenizer


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """One cache for the module, built once (python-code takes about a second)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EFFLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_shape_dtype_and_seed(built_cache, tokenizer):
    first = data.calibration("python-docs", tokenizer, n_samples=8, seq_len=64, seed=0)
    assert first.shape == (8, 64) and first.dtype == torch.long
    assert torch.equal(first, data.calibration("python-docs", tokenizer, n_samples=8, seq_len=64, seed=0))
    assert not torch.equal(first, data.calibration("python-docs", tokenizer, n_samples=8, seq_len=64, seed=1))


def test_calibration_windows_are_contiguous_slices_of_the_tokenized_corpus(built_cache, tokenizer):
    text = data.corpus_text("python-docs")
    assert data.calibration_text("python-docs") == text  # under the cap: the whole corpus
    tokens = data.calibration_tokens("python-docs", tokenizer)
    # Byte-level tokenizer: per-document tokenization joined by separators equals tokenizing the text.
    assert tokens.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    seq_len = 48
    all_windows = tokens.unfold(0, seq_len, 1)  # [len - seq_len + 1, seq_len]
    for window in data.calibration("python-docs", tokenizer, n_samples=6, seq_len=seq_len, seed=3):
        assert (all_windows == window).all(dim=1).any()


def test_calibration_cap_keeps_whole_documents_in_corpus_order(built_cache):
    capped = data.windows._capped_documents("python-code", None, max_chars=200_000)
    everything = data.documents("python-code")
    assert 0 < sum(len(d) + 2 for d in capped) <= 200_000
    remaining = iter(everything)
    assert all(any(doc == other for other in remaining) for doc in capped)  # an ordered sub-sequence


def test_calibration_rejects_a_corpus_shorter_than_seq_len(built_cache, tokenizer):
    n_tokens = len(data.calibration_tokens("humaneval", tokenizer))
    # Exactly seq_len + 1 tokens is enough (one possible start) ...
    window = data.calibration("humaneval", tokenizer, n_samples=2, seq_len=n_tokens - 1)
    assert torch.equal(window[0], data.calibration_tokens("humaneval", tokenizer)[: n_tokens - 1])
    # ... one more is not, and the message gives both numbers.
    with pytest.raises(ValueError, match=rf"{n_tokens} tokens.*seq_len={n_tokens}"):
        data.calibration("humaneval", tokenizer, n_samples=2, seq_len=n_tokens)


@pytest.mark.parametrize(("n_samples", "seq_len"), [(0, 16), (4, 0)])
def test_calibration_rejects_empty_requests(built_cache, tokenizer, n_samples, seq_len):
    with pytest.raises(ValueError, match="must be >= 1"):
        data.calibration("arithmetic", tokenizer, n_samples=n_samples, seq_len=seq_len)


# --------------------------------------------------------------------------------------------------
# Built-in sets


def test_arithmetic_answers_are_correct(built_cache):
    problems = data.load("arithmetic", split="all")
    assert len(problems) == data.ARITHMETIC_PROBLEMS
    assert len(set(problems["question"])) == len(problems)
    assert set(problems["operation"]) == {"add", "sub", "mul", "mul-sub", "add-sub", "mul-add"}
    for problem in problems:
        assert data.evaluate_expression(problem["expression"]) == problem["answer"] >= 0
        assert problem["solution"].endswith(f"The answer is {problem['answer']}.")
        assert metrics.extract_answer(problem["solution"]) == problem["answer"]


def test_arithmetic_is_reproducible(built_cache):
    assert data.builtin._build_arithmetic() == data.builtin._build_arithmetic()


def test_extract_answer_and_score():
    assert metrics.extract_answer("3 + 4 = 7. The answer is 1,234.") == 1234
    assert metrics.extract_answer("so the total is\n#### -5") == -5
    assert metrics.extract_answer("first 3, then 4, finally 12") == 12
    assert metrics.extract_answer("The answer is 2.5") is None
    assert metrics.extract_answer("I don't know") is None
    assert metrics.score_arithmetic(["The answer is 3.", "4", 5, None], [3, 5, 5, 1]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        metrics.score_arithmetic(["1", "2"], [1])


def test_humaneval_has_164_problems_whose_solutions_pass(built_cache):
    problems = data.load("humaneval")
    assert len(problems) == 164
    assert problems["task_id"] == [f"HumanEval/{i}" for i in range(164)]
    assert set(problems.column_names) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    for problem in problems.select(range(3)):
        namespace: dict = {}
        exec(problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"], namespace)
        namespace["check"](namespace[problem["entry_point"]])


@pytest.mark.parametrize("name", ["python-code", "python-docs", "arithmetic"])
def test_splits_are_disjoint_and_cover_the_set(built_cache, name):
    key = "question" if name == "arithmetic" else "source"
    parts = {split: set(data.load(name, split=split)[key]) for split in ("train", "validation", "test")}
    assert all(parts.values())
    assert not (parts["train"] & parts["validation"] or parts["train"] & parts["test"]
                or parts["validation"] & parts["test"])
    assert set.union(*parts.values()) == set(data.load(name, split="all")[key])


def test_python_code_skips_tests_and_large_files(built_cache):
    sources = data.load("python-code", split="all")["source"]
    assert sources == sorted(sources) and "os.py" in sources
    skipped = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    assert not any(skipped & set(source.split("/")[:-1]) for source in sources)
    assert all(len(text.encode()) <= data.STDLIB_MAX_FILE_BYTES * 1.01 for text in data.documents("python-code"))


def test_corrupt_or_truncated_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    reference = data.load("python-docs", split="all").to_list()
    path = data.builtin_path("python-docs")
    good_bytes = path.read_bytes()

    path.write_text("this is not json\n{]")
    assert data.load("python-docs", split="all").to_list() == reference
    assert path.read_bytes() == good_bytes

    path.write_bytes(good_bytes.rsplit(b"\n", 2)[0] + b"\n")  # last record missing: checksum mismatch
    assert data.load("python-docs", split="all").to_list() == reference
    assert path.read_bytes() == good_bytes
    assert not list(path.parent.glob("*.tmp"))


def test_build_command_prints_one_line_per_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    assert data.main(["build", "python-docs", "arithmetic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("arithmetic") and f"{data.ARITHMETIC_PROBLEMS} records" in lines[1]


def test_english_prose_needs_fortunes_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(data.builtin, "FORTUNE_DIRS", (tmp_path / "no-fortunes",))
    with pytest.raises(data.DataNotAvailableError, match="fortunes-min.*python-docs"):
        data.load("english-prose")


def test_english_prose_is_built_from_fortune_files(tmp_path, monkeypatch):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "wisdom").write_text("A penny saved.\n%\nLook before\nyou leap.\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(data.builtin, "FORTUNE_DIRS", (folder,))
    assert sorted(data.load("english-prose", split="all")["text"]) == ["A penny saved.", "Look before\nyou leap."]


# --------------------------------------------------------------------------------------------------
# Names, splits and the hub


def test_offline_hub_name_raises_before_touching_the_network(monkeypatch):
    monkeypatch.delenv("EFFLLM_STANDINS", raising=False)  # stand-ins off: the real hub path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(data.DataNotAvailableError, match="wikitext2") as error:
        data.load("wikitext2")
    message = str(error.value)
    assert "hub cannot be reached" in message
    assert all(name in message for name in data.BUILTIN)


def test_hub_connection_failure_becomes_data_not_available(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("EFFLLM_STANDINS", raising=False)
    calls = []

    def unreachable(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Failed to resolve huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(data.DataNotAvailableError, match="'c4'.*python-code"):
        data.load("c4", split="validation")
    assert calls == [(("allenai/c4", None), {"split": "validation", "data_files": data.HUB["c4"].data_files})]


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError, match="Unknown data set 'wikitext-9'") as error:
        data.load("wikitext-9")
    assert all(name in str(error.value) for name in [*data.BUILTIN, *data.HUB, *data.HUB_ALIASES])


def test_bad_split_lists_splits(built_cache):
    with pytest.raises(ValueError, match="no split 'dev'.*train, validation, test"):
        data.load("arithmetic", split="dev")
    with pytest.raises(ValueError, match="no split 'train'.*test"):
        data.load("humaneval", split="train")
    with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
        data.load("squad", split="test")


# --------------------------------------------------------------------------------------------------
# Multiple-choice tasks (zero-shot through lm-eval)


def test_arithmetic_mc_has_the_answer_among_four_distinct_numbers(built_cache):
    items = data.load("arithmetic-mc", split="test").to_list()
    assert len(items) == data.ARITHMETIC_MC_PROBLEMS
    known = set(data.load("arithmetic", split="all")["question"])
    assert not known & {item["question"] for item in items}  # fresh problems, never calibration text
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == data.MC_CHOICES
        assert all(choice.isdigit() for choice in item["choices"])  # non-negative integers
        assert item["choices"][item["label"]] == str(item["answer"])
    # Numbers in the question give the answer through the stated operation (spot check on 'add').
    for item in (i for i in items if i["operation"] == "add"):
        a, b = map(int, re.findall(r"\d+", item["question"])[:2])
        assert item["answer"] == a + b
    labels = [item["label"] for item in items]
    assert all(labels.count(k) > len(items) / 8 for k in range(4))  # the right answer moves around


def test_prose_mc_endings_complete_held_out_sentences(built_cache):
    items = data.load("prose-mc", split="test").to_list()
    held_out = " ".join(" ".join(doc.split()) for split in ("validation", "test")
                        for doc in data.documents("python-docs", split))
    train = " ".join(" ".join(doc.split()) for doc in data.documents("python-docs", "train"))
    assert len(items) > 150
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == data.MC_CHOICES
        sentence = f"{item['context']} {item['choices'][item['label']]}"
        assert sentence in held_out
        assert data.PROSE_MC_MIN_WORDS <= len(sentence.split()) <= data.PROSE_MC_MAX_WORDS
        assert sentence not in train  # never calibration text


@pytest.mark.parametrize("name", ["arithmetic-mc", "prose-mc"])
def test_multiple_choice_sets_are_reproducible_and_test_only(built_cache, name):
    assert data.builtin._BUILDERS[name]() == data.builtin._BUILDERS[name]()
    with pytest.raises(ValueError, match="no split 'train'.*test"):
        data.load(name, split="train")


# --------------------------------------------------------------------------------------------------
# Layering: stand-ins know nothing of effllm.data; `python -m effllm.data` stays the set-up command


def test_standins_import_no_part_of_effllm_data():
    """The dependency runs one way (data -> standins): importing the stand-ins loads no effllm.data module."""
    import subprocess
    import sys

    code = ("import sys, effllm.standins, effllm.word_problems; "
            "print(sorted(m for m in sys.modules if m == 'effllm.data' or m.startswith('effllm.data.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_m_effllm_data_lists_every_set():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "effllm.data", "list"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [*data.BUILTIN, *data.HUB]

