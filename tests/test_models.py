"""Loading: tiny models, bad names, offline hub ids, and the embedded models' safetensors cache."""

import shutil

import pytest
import torch

from effllm import models
from effllm.adapters import get_adapter
from effllm.models import ModelNotAvailableError, cache_is_valid, load_model, tiny_model


def test_tiny_models_are_deterministic_per_seed():
    a, _ = tiny_model("opt", seed=3)
    b, _ = tiny_model("opt", seed=3)
    c, _ = tiny_model("opt", seed=4)
    wa, wb, wc = (get_adapter(m).embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_overrides_reach_the_config():
    model, tokenizer = tiny_model("gemma3", num_hidden_layers=6)
    assert get_adapter(model).num_layers == 6
    assert len(model.config.layer_types) == 6
    assert tokenizer.decode(tokenizer("héllo\n  x")["input_ids"]) == "héllo\n  x"


def test_tiny_name_through_load_model():
    model, _ = load_model("tiny-qwen2")
    assert model.config.model_type == "qwen2" and not model.training


def test_unknown_tiny_family_lists_families():
    with pytest.raises(ModelNotAvailableError, match="allowed: gemma3, gpt2, llama, mistral, opt, qwen2, t5"):
        tiny_model("bert")


@pytest.mark.parametrize("name", ["smollm3-1b", "no/such/path/x", "./missing-folder"])
def test_unknown_model_name_lists_embedded(name):
    with pytest.raises(ModelNotAvailableError) as error:
        load_model(name)
    message = str(error.value)
    assert repr(name) in message and "smollm2-135m" in message and "gemma3-270m" in message


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE") as error:
        load_model("meta-llama/Llama-3.2-1B")
    assert "smollm2-135m" in str(error.value) and "meta-llama/Llama-3.2-1B" in str(error.value)


def test_local_folder_roundtrip(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.embedded
def test_embedded_smollm2_answers_and_matches_its_architecture():
    model, tokenizer = load_model("smollm2-135m")
    facts = models.describe(model)
    assert (facts["layers"], facts["hidden_size"], facts["vocab_size"]) == (30, 576, 49152)
    assert facts["parameters"] == 134_515_008 and facts["tied_embeddings"]
    assert "Paris" in models.chat(model, tokenizer, "What is the capital of France?", max_new_tokens=16)


@pytest.mark.embedded
def test_corrupt_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    source = models.embedded_model_dir("smollm2-135m")  # the user's cache: converted once, then reused
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(source, folder)
    assert cache_is_valid(folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:  # flip bytes inside the tensor data
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x00" * 4096)
    assert not cache_is_valid(folder)
    model, _ = load_model("smollm2-135m")
    assert cache_is_valid(folder)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    original = models.AutoModelForCausalLM.from_pretrained(source)
    torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_partial_cache_without_manifest_is_invalid(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"partial")
    assert not cache_is_valid(tmp_path)
    (tmp_path / models.MANIFEST).write_text("{not json")
    assert not cache_is_valid(tmp_path)
