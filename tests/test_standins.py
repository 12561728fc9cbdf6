"""Stand-ins: with EFFLLM_STANDINS=1 the papers' hub model ids and data set names load offline, as tiny random
models with the originals' structure and as generated data with the hub sets' schemas; every name the paper
profile, the Wanda sweep and the seeds use has one."""

from __future__ import annotations

import json
import os
import re

import datasets
import pytest
import torch
import yaml

import run_all
from effllm import data, domains, exits, metrics, models, records, standins
from effllm.adapters import get_adapter
from effllm.models import ModelNotAvailableError, load_model, tiny_tokenizer


@pytest.fixture
def standins_on(monkeypatch):
    monkeypatch.setenv(standins.ENV_VAR, "1")
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # nothing may reach for the hub
        monkeypatch.setenv(variable, "1")


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to load from the hub fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail(f"the hub was asked for {args[:1]}")

    for auto in (models.AutoModelForCausalLM, models.AutoModelForSeq2SeqLM, models.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_switch_from_the_environment_and_from_code(monkeypatch):
    monkeypatch.delenv(standins.ENV_VAR, raising=False)
    assert not standins.enabled()
    with standins.active():
        assert standins.enabled() and os.environ[standins.ENV_VAR] == "1"  # notebook kernels inherit it
    assert not standins.enabled() and standins.ENV_VAR not in os.environ
    monkeypatch.setenv(standins.ENV_VAR, "true")
    assert standins.enabled()
    with standins.active(False):
        assert not standins.enabled()
    assert os.environ[standins.ENV_VAR] == "true"
    monkeypatch.setenv(standins.ENV_VAR, "0")
    assert not standins.enabled()


# --------------------------------------------------------------------------------------------------
# Models

# The originals' structure, from their config.json / tokenizer (see effllm.standins): model_type, decoder layers,
# vocabulary, tied head, query heads per K/V head, chat template, id the tokenizer puts first / last.
ORIGINALS = {
    "google-t5/t5-large": ("t5", 24, 32128, True, 1, False, None, 1),
    "jvelja/t5-squad": ("t5", 24, 32128, True, 1, False, None, 1),
    "jvelja/t5-samsum": ("t5", 24, 32128, True, 1, False, None, 1),
    "facebook/opt-iml-1.3b": ("opt", 24, 50272, True, 1, False, 2, None),
    "facebook/opt-350m": ("opt", 24, 50272, True, 1, False, 2, None),
    "google/gemma-1.1-7b-it": ("gemma", 28, 256000, True, 1, True, 2, None),
    "codellama/CodeLlama-13b-Instruct-hf": ("llama", 40, 32016, False, 1, True, 1, None),
    "meta-llama/Meta-Llama-3-8B": ("llama", 32, 128256, False, 4, False, 128000, None),
    "mistralai/Mistral-7B-v0.1": ("mistral", 32, 32000, False, 4, False, 1, None),
    "meta-llama/Llama-3.2-1B": ("llama", 16, 128256, True, 4, False, 128000, None),
    "Qwen/Qwen2.5-0.5B": ("qwen2", 24, 151936, True, 7, True, None, None),
}
_LOADED: dict[str, tuple] = {}  # hub id -> (model, tokenizer), loaded once for the module's tests


@pytest.fixture(scope="module", autouse=True)
def _free_loaded_models():
    yield
    _LOADED.clear()


def _load(hub_id):
    if hub_id not in _LOADED:
        _LOADED[hub_id] = load_model(hub_id)
    return _LOADED[hub_id]


def test_every_standin_model_is_described():
    assert set(ORIGINALS) == set(standins.STANDIN_MODELS)


@pytest.mark.parametrize("hub_id", sorted(ORIGINALS))
def test_standin_model_has_the_originals_structure(hub_id, standins_on, no_hub, caplog):
    model_type, layers, vocab, tied, group, chat, first, last = ORIGINALS[hub_id]
    with caplog.at_level("WARNING", logger="effllm.standins"):
        model, tokenizer = load_model(hub_id)
    _LOADED[hub_id] = (model, tokenizer)
    assert records.STANDIN.get(model) == hub_id and model.config.model_type == model_type
    assert any("mean nothing" in record.getMessage() and hub_id in record.getMessage() for record in caplog.records)
    facts = models.describe(model)
    assert (facts["layers"], facts["vocab_size"], facts["tied_embeddings"]) == (layers, vocab, tied)
    assert facts["hidden_size"] <= 112 and facts["parameters"] < 20_000_000  # tiny: seconds on a CPU
    text = model.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or text.num_heads
    assert heads // (getattr(text, "num_key_value_heads", None) or heads) == group
    assert (tokenizer.chat_template is not None) == chat and tokenizer.pad_token_id is not None
    ids = tokenizer("Hello world")["input_ids"]
    assert (ids[0] == first) if first is not None else ids[0] not in tokenizer.all_special_ids
    assert (ids[-1] == last) if last is not None else ids[-1] not in tokenizer.all_special_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_standins_keep_the_code_paths_of_their_originals(standins_on):
    t5 = get_adapter(_load("google-t5/t5-large")[0])
    assert t5.model.config.scale_decoder_outputs and set(t5.mlp_projections(0)) == {"up", "down"}  # ReLU, tied
    assert t5.model.config.num_layers == 24  # the encoder too
    gemma = get_adapter(_load("google/gemma-1.1-7b-it")[0])
    assert gemma.weight(gemma.attention_projections(0)["q"]).shape[0] > gemma.hidden_size  # 16 x 256 > 3072
    post_norm = get_adapter(_load("facebook/opt-350m")[0])
    assert post_norm.final_norm is None and post_norm.decoder.project_in is not None
    assert get_adapter(_load("facebook/opt-iml-1.3b")[0]).decoder.project_in is None
    mistral = get_adapter(_load("mistralai/Mistral-7B-v0.1")[0])
    assert mistral.config.sliding_window == 4096 and set(mistral.layer_types) == {"sliding_attention"}
    llama32 = _load("meta-llama/Llama-3.2-1B")[0]
    assert llama32.config.rope_parameters["rope_type"] == "llama3"
    qwen = get_adapter(_load("Qwen/Qwen2.5-0.5B")[0])
    assert qwen.attention_projections(0)["q"].bias is not None


@pytest.mark.parametrize("hub_id", sorted(ORIGINALS))
def test_standin_decodes_as_hf_generate_through_its_adapter(hub_id, standins_on):
    model, tokenizer = _load(hub_id)
    if model.config.is_encoder_decoder:  # a padded batch of sources, as T5 gets them
        encoded = tokenizer(["summarize: the river and the bridge", "question: where?"], padding=True,
                            return_tensors="pt")
    else:
        encoded = tokenizer(["The quick brown fox"], return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)
    kwargs = {"attention_mask": mask} if model.config.is_encoder_decoder else {}
    out = exits.generate(model, ids, 8, method="full", eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, expected)


def test_standin_follows_dtype_and_is_seeded(standins_on):
    model, _ = load_model("meta-llama/Llama-3.2-1B", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again, _ = load_model("meta-llama/Llama-3.2-1B", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    same, _ = load_model("facebook/opt-350M")  # hub ids resolve case-insensitively, as on the hub
    assert records.STANDIN.get(same) == "facebook/opt-350m"


def test_unknown_hub_model_with_standins_on_lists_the_known_ones(standins_on, no_hub):
    with pytest.raises(ModelNotAvailableError, match="'someone/unknown-7b' has no stand-in") as error:
        load_model("someone/unknown-7b")
    assert all(hub_id in str(error.value) for hub_id in standins.STANDIN_MODELS)


def test_embedded_tiny_and_folder_names_are_not_stood_in(standins_on):
    model, _ = load_model("tiny-llama")
    assert not records.STANDIN.present(model)


# --------------------------------------------------------------------------------------------------
# Data

# Column names in the order of each hub set's card (effllm.standins.data_features holds the full spec).
CARD_COLUMNS = {
    "squad": ["id", "title", "context", "question", "answers"],
    "samsum": ["id", "dialogue", "summary"],
    "cnn_dailymail": ["article", "highlights", "id"],
    "wikitext2": ["text"],
    "pg19": ["short_book_title", "publication_date", "url", "text"],
    "c4": ["text", "timestamp", "url"],
    "gsm8k": ["question", "answer"],
    "hellaswag": ["ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type",
                  "label"],
    "winogrande": ["sentence", "option1", "option2", "answer"],
    "arc_easy": ["id", "question", "choices", "answerKey"],
    "arc_challenge": ["id", "question", "choices", "answerKey"],
    "piqa": ["goal", "sol1", "sol2", "label"],
    "mmlu": ["question", "subject", "choices", "answer"],
    "boolq": ["question", "answer", "passage"],
    "rte": ["sentence1", "sentence2", "label", "idx"],
    "alpaca": ["instruction", "input", "output", "text"],
    "python_alpaca": ["instruction", "input", "output", "prompt"],
    "apps": ["problem_id", "question", "solutions", "input_output", "difficulty", "url", "starter_code"],
    "github_python": ["repo_name", "path", "copies", "size", "content", "license", "hash", "line_mean", "line_max",
                      "alpha_frac", "autogenerated"],
    "openbookqa": ["id", "question_stem", "choices", "answerKey"],
    "commonsenseqa": ["id", "question", "question_concept", "choices", "answerKey"],
    "wmt14": ["translation"],
    "song_translation": ["artist_name", "album_name", "year", "title", "number", "original_version",
                         "french_version", "language"],
    "opus_books": ["id", "translation"],
    "math_qa": ["Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category"],
    "math_instruct": ["source", "output", "instruction"],
    "math_orca": ["question", "answer"],
    "mbpp": ["task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"],
    "iwslt2017": ["translation"],
}


def test_every_hub_name_has_a_standin_and_a_card_schema():
    assert set(standins.STANDIN_DATA) == set(data.HUB) == set(CARD_COLUMNS)
    assert data.HUB_ALIASES == {"orca_math": "math_orca"}


@pytest.mark.parametrize("name", sorted(CARD_COLUMNS))
def test_standin_data_has_the_hub_schema(name, standins_on, no_hub):
    spec = standins.data_features(name)
    assert list(spec) == CARD_COLUMNS[name]
    for split in data.HUB[name].splits:
        rows = data.load(name, split)
        assert isinstance(rows, datasets.Dataset) and rows.split == split
        assert rows.features == spec and rows.column_names == CARD_COLUMNS[name]
        assert len(rows) == standins.ROWS_PER_SPLIT
        assert rows.to_list() == data.load(name, split).to_list()  # seeded
        docs = data.documents(name, split)
        assert len(docs) == len(rows) and all(isinstance(d, str) for d in docs)
        assert sum(map(len, docs)) > 2048  # one 2048-token calibration window with a byte-level tokenizer
    splits = data.HUB[name].splits
    if len(splits) > 1:
        assert data.load(name, splits[0]).to_list() != data.load(name, splits[1]).to_list()


def _rows(name):
    return [(split, row) for split in data.HUB[name].splits for row in data.load(name, split)]


def test_standin_rows_read_like_their_hub_sets(standins_on):
    for _, row in _rows("squad"):
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(text)] == text
    for _, row in _rows("gsm8k"):
        assert re.search(r"\n#### \d+$", row["answer"]) and metrics.extract_answer(row["answer"]) is not None
    for split, row in _rows("hellaswag"):
        assert len(row["endings"]) == 4 and row["ctx"] == f"{row['ctx_a']} {row['ctx_b']}"
        assert row["label"] == "" if split == "test" else 0 <= int(row["label"]) < 4
    for name in ("arc_easy", "arc_challenge", "openbookqa", "commonsenseqa"):
        for split, row in _rows(name):
            assert row["answerKey"] in row["choices"]["label"] or (name == "commonsenseqa" and split == "test")
    for name in ("piqa", "rte"):
        for split, row in _rows(name):
            assert (row["label"] == -1) == (split == "test")
    for split, row in _rows("winogrande"):
        assert "_" in row["sentence"] and row["answer"] in (("",) if split == "test" else ("1", "2"))
    for _, row in _rows("math_qa"):
        assert f"{row['correct']} )" in row["options"]
    for name, languages in (("wmt14", {"fr", "en"}), ("opus_books", {"en", "fr"}), ("iwslt2017", {"en", "de"})):
        for _, row in _rows(name):
            assert set(row["translation"]) == languages and all(row["translation"].values())
    for _, row in _rows("apps"):
        assert isinstance(json.loads(row["solutions"]), list) and set(json.loads(row["input_output"])) == {
            "inputs", "outputs"}
    for _, row in _rows("mbpp")[:8]:  # the reference solutions pass their tests
        namespace: dict = {}
        exec(row["code"] + "\n" + "\n".join(row["test_list"]), namespace)


def test_orca_math_is_an_alias_of_math_orca(standins_on):
    assert data.load("orca_math").to_list() == data.load("math_orca").to_list()
    assert data.documents("orca_math") == data.documents("math_orca")
    assert data.HUB["math_orca"].path == "microsoft/orca-math-word-problems-200k"


def test_without_standins_hub_names_still_need_the_hub(monkeypatch, no_hub):
    monkeypatch.delenv(standins.ENV_VAR, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("math_qa", "wmt14", "orca_math"):
        with pytest.raises(data.DataNotAvailableError, match="Built-in alternatives") as error:
            data.load(name)
        assert all(builtin in str(error.value) for builtin in data.BUILTIN)


def test_unknown_hub_data_with_standins_on_lists_the_known_ones(standins_on, no_hub):
    with pytest.raises(standins.NoStandInError, match="'someone/data' has no stand-in") as error:
        data.load("someone/data")
    assert all(name in str(error.value) for name in data.HUB)


# --------------------------------------------------------------------------------------------------
# Every name the sweep and the paper profile use resolves


def _sweep_calibration_sets() -> list[str]:
    sweep = yaml.safe_load((run_all.REPO_ROOT / "sweeps" / "wanda_calibration_sets.yaml").read_text())
    return sorted({name for entry in sweep["grid"] for sets in entry["calibration_sets"] for name in sets})


def test_sweep_calibration_sets_resolve_to_calibration_windows(standins_on, no_hub):
    names = _sweep_calibration_sets()
    assert len(names) == 13
    tokenizer = tiny_tokenizer()
    for name in names:
        assert data.canonical_name(name) in data.HUB
        assert domains.HUB_CALIBRATION_DOMAINS[name] in ("code", "commonsense", "translation", "math", "web text")
        windows = data.calibration(name, tokenizer, n_samples=2, seq_len=256, split="train")
        assert windows.shape == (2, 256)


DATA_PARAMETERS = ("prompt_data", "calibration_sets", "perplexity_domains", "math_task", "calibration_data",
                   "eval_data", "similarity_corpus", "task", "weight_view_pair")


def test_every_hub_name_of_the_paper_profile_has_a_standin(standins_on, no_hub):
    profile = run_all.PROFILES["paper"]
    model_ids, data_names = set(), set()
    for parameters in profile.values():
        model_ids |= {parameters[k] for k in ("model_name",) if k in parameters}
        model_ids |= set(parameters.get("model_names", []))
        for key in DATA_PARAMETERS:
            value = parameters.get(key)
            values = value.values() if isinstance(value, dict) else [value] if isinstance(value, str) else value or []
            data_names |= set(values)
    assert {"google-t5/t5-large", "jvelja/t5-squad", "google/gemma-1.1-7b-it"} <= model_ids
    for hub_id in model_ids:
        assert standins.find_model_standin(hub_id).hub_id.lower() == hub_id.lower()
    hub_names = {n for n in data_names if n not in data.BUILTIN}
    assert {"squad", "samsum", "wikitext2", "c4", "alpaca", "orca_math"} <= hub_names
    for name in hub_names:
        assert len(data.load(name, data.HUB[data.canonical_name(name)].splits[0])) == standins.ROWS_PER_SPLIT
