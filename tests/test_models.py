"""Loading: tiny models, bad names, offline hub ids, and the embedded models' safetensors cache."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm import models, precision
from effllm.adapters import get_adapter
from effllm.models import ModelNotAvailableError, cache_is_valid, load_model, tiny_model

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ModelNotAvailableError, match="allowed: gemma, gemma3, gpt2, llama, mistral, opt, qwen2, t5, t5-tied"):
        tiny_model("bert")


@pytest.mark.parametrize("name", ["smollm3-1b", "no/such/path/x", "./missing-folder"])
def test_unknown_model_name_lists_embedded(name):
    with pytest.raises(ModelNotAvailableError) as error:
        load_model(name)
    message = str(error.value)
    assert repr(name) in message and "smollm2-135m" in message and "gemma3-270m" in message


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("EFFLLM_STANDINS", raising=False)  # stand-ins off: the real hub path
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_corrupt_cache_is_rebuilt_not_used(tmp_path, monkeypatch, dtype):
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
    model, _ = load_model("smollm2-135m", dtype=dtype)
    assert cache_is_valid(folder)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    original = models.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    with torch.no_grad():  # the same weights in the same precision: the same logits (assert_close's dtype tolerance)
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_partial_cache_without_manifest_is_invalid(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"partial")
    assert not cache_is_valid(tmp_path)
    (tmp_path / models.MANIFEST).write_text("{not json")
    assert not cache_is_valid(tmp_path)


def test_cache_from_an_older_effllm_is_stale_not_used(tmp_path):
    import json

    from effllm.io import sha256_file

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    files = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    (tmp_path / "effllm-manifest.json").write_text(json.dumps({"source": "x.gguf", "files": files}))
    assert not cache_is_valid(tmp_path)  # rebuilt by embedded_model_dir, never read


def fake_embedded(monkeypatch, name="tiny-embedded"):
    """An embedded-model spec whose "conversion" builds tiny-llama (no GGUF), to test the cache machinery."""
    spec = models.EmbeddedModel(name, "no_such_package", "a tiny stand-in")
    monkeypatch.setattr(models.EmbeddedModel, "gguf_path", lambda self: models.Path("/nowhere/tiny.gguf"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: models.tiny_tokenizer())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama")[0])
    monkeypatch.setitem(models.EMBEDDED_MODELS, name, spec)
    return spec


def test_conversion_killed_part_way_leaves_no_staging_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    fake_embedded(monkeypatch)
    folder = tmp_path / "models" / "tiny-embedded"
    folder.parent.mkdir(parents=True)
    for leftover in (".tiny-embedded-k1ll3d", ".tiny-embedded.staging-k1ll3d"):  # SIGKILLed conversions, old and new
        (folder.parent / leftover).mkdir()
        (folder.parent / leftover / "model.safetensors").write_bytes(b"\0" * 1024)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(type(tiny_model("llama")[0]), "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            models.embedded_model_dir("tiny-embedded")
    assert sorted(p.name for p in folder.parent.iterdir()) == [".tiny-embedded.lock"]

    converted = models.embedded_model_dir("tiny-embedded")
    assert cache_is_valid(converted) and sorted(p.name for p in folder.parent.iterdir()) == [
        ".tiny-embedded.lock", "tiny-embedded"]
    (converted / "config.json").write_text("{}")  # corrupt: rebuilt on the next load
    assert cache_is_valid(models.embedded_model_dir("tiny-embedded"))


def test_bad_dtype_names_the_allowed_ones():
    for dtype in ("float99", "int8", 16, torch.int64):
        with pytest.raises(ValueError, match=f"dtype must be one of float32, float16, bfloat16, float64.*got {dtype!r}"):
            load_model("tiny-llama", dtype=dtype)
    assert next(load_model("tiny-llama", dtype="bfloat16")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model("tiny-llama", dtype="torch.float16")[0].parameters()).dtype == torch.float16


def test_unusable_cache_folder_says_what_to_do(tmp_path, monkeypatch):
    import os

    from effllm.paths import cache_dir

    afile = tmp_path / "a-file"
    afile.write_text("x")
    monkeypatch.setenv("EFFLLM_CACHE", str(afile))
    with pytest.raises(ValueError, match=r"EFFLLM_CACHE='.*a-file' is a file, not a folder.*point EFFLLM_CACHE at"):
        cache_dir()
    monkeypatch.setenv("EFFLLM_CACHE", str(afile / "below"))
    with pytest.raises(ValueError, match=r"cannot be created \(Not a directory\).*writable folder"):
        cache_dir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root may write anyway)
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="is not writable for this user"):
        cache_dir()


def test_fingerprint_follows_the_identifying_weights():
    from effllm.models import fingerprint

    model, _ = tiny_model("llama")
    assert fingerprint(model) == fingerprint(tiny_model("llama")[0])
    assert fingerprint(model) != fingerprint(tiny_model("llama", seed=1)[0])
    assert fingerprint(model) != fingerprint(tiny_model("llama")[0].to(torch.bfloat16))
    with torch.no_grad():
        get_adapter(model).norms(2)["mlp"].weight[0] += 1e-3  # one norm weight
    assert fingerprint(model) != fingerprint(tiny_model("llama")[0])


# ---------------------------------------------------------------------------------------------------------
# Placement: device_map, max_memory, offload folder; the decoding engine on a model spread over devices

SPREAD = {  # layers 1 and 2 offloaded to disk: parameters on "meta", weights in the offload folder
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
}


def test_device_map_offloads_and_keeps_the_outputs(tmp_path):
    reference, _ = tiny_model("llama")
    model, _ = load_model("tiny-llama", device_map=SPREAD, offload_folder=tmp_path / "offload")
    adapter = get_adapter(model)
    assert adapter.attention(1).q_proj.weight.device.type == "meta"
    assert (tmp_path / "offload" / "model.layers.1.self_attn.q_proj.weight.dat").is_file()
    assert adapter.layer_device(1) == torch.device("cpu")  # its hook's execution device
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("method", ["full", "calm", "free"])
def test_decoding_engine_on_an_offloaded_model_equals_the_resident_one(method, tmp_path):
    """exits.generate through the adapters (run_layer, append_kv for CALM's state propagation, logits)."""
    from effllm import exits

    reference, _ = tiny_model("llama")
    model, _ = load_model("tiny-llama", device_map=SPREAD, offload_folder=tmp_path / "offload")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    params = {"full": {}, "calm": {"exit_conf_threshold": 0.0, "exit_min_layer": 1},
              "free": {"shallow_exit_layer": 2, "shallow2deep_conf_threshold": 0.0}}[method]
    got = exits.generate(model, ids, 8, method=method, eos_token_id=[], **params)
    expected = exits.generate(reference, ids, 8, method=method, eos_token_id=[], **params)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.exit_layers, expected.exit_layers)
    if method == "full":
        hf = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones_like(ids))
        assert torch.equal(got.sequences, hf)


def test_device_map_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="auto, balanced, balanced_low_0, sequential"):
        load_model("tiny-llama", device_map="everywhere")
    with pytest.raises(ValueError, match="not both"):
        load_model("tiny-llama", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="need a device_map"):
        load_model("tiny-llama", max_memory={"cpu": "1GiB"})


def test_hub_ids_default_to_device_map_auto_on_a_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("EFFLLM_MAX_MEMORY", "0=70GiB, 1=70GiB,cpu=200GiB")
    options = models.device_map_options("meta-llama/Llama-3.2-1B", None, None, None, None)
    assert options == {"device_map": "auto", "max_memory": {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}}
    assert models.device_map_options("smollm2-135m", None, None, None, None) == {}  # embedded: one device
    assert models.device_map_options("meta-llama/Llama-3.2-1B", "cuda:0", None, None, None) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("EFFLLM_MAX_MEMORY")
    assert models.device_map_options("meta-llama/Llama-3.2-1B", None, None, None, None) == {}
    monkeypatch.setenv("EFFLLM_MAX_MEMORY", "lots")
    with pytest.raises(ValueError, match="EFFLLM_MAX_MEMORY"):
        models.device_map_options("a/b", None, "auto", None, None)


# ---------------------------------------------------------------------------------------------------------
# Layering: the registry of model sources ("-ee"), no training import, precision without torch


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet), from the repository root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_models_imports_no_training_code():
    result = run_fresh("import sys, effllm.models\n"
                       "print(sorted(m for m in sys.modules if m.startswith('effllm.training')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_precision_imports_without_torch():
    blocked = ("import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
               "from effllm import precision\n"
               "print(precision.DTYPE_CHOICES, precision.cpu_isa({'avx2'}, False), bool(precision.cpu_model()))")
    result = run_fresh(blocked)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["('auto',", "'float32',", "'bfloat16')", "AVX2", "True"]
    other = subprocess.run([sys.executable, "-m", "effllm.precision", "--other"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert other.stdout.strip() == ("float32" if models.cpu_supports_bfloat16() else "bfloat16")


def test_an_exit_trained_name_goes_through_the_registered_source(monkeypatch):
    calls = []

    def fake_loader(name, dtype=None, device=None):
        calls.append((name, dtype, device))
        return tiny_model("gpt2")

    declared = models.source_for("smollm2-135m-ee")
    assert declared.loader == "effllm.training:load_exit_trained"  # named, imported only when loading
    monkeypatch.setitem(models.SOURCES, "-ee", models.ModelSource("-ee", fake_loader, "a fake"))
    model, _ = load_model("smollm2-135m-ee", dtype="bfloat16", device="cpu")
    assert calls == [("smollm2-135m-ee", "bfloat16", "cpu")] and model.config.model_type == "gpt2"


def test_the_declared_exit_trained_source_resolves_to_the_training_loader():
    from effllm.training import load_exit_trained

    assert models.source_for("tiny-llama-ee").resolve() is load_exit_trained


def test_a_registered_source_takes_its_suffix_until_removed(tmp_path):
    models.register_source("-fake", lambda name, dtype=None, device=None: (name, dtype), "fake models")
    try:
        assert load_model("tiny-llama-fake", dtype="float16") == ("tiny-llama-fake", "float16")
        with pytest.raises(ModelNotAvailableError, match=r"suffix -fake \(smollm2-135m-fake\): fake models"):
            load_model("no-such-model")
        folder = tmp_path / "saved-fake"  # a folder is a folder, whatever its name ends in
        folder.mkdir()
        assert models.source_for(str(folder)) is None
    finally:
        assert models.unregister_source("-fake") is not None
    assert models.source_for("tiny-llama-fake") is None
    with pytest.raises(ModelNotAvailableError, match="Unknown tiny model family 'llama-fake'"):
        load_model("tiny-llama-fake")


def test_register_source_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="non-empty suffix"):
        models.register_source("", print, "nothing")
    with pytest.raises(ValueError, match="'package.module:function'; got 'effllm.training'"):
        models.register_source("-x", "effllm.training", "a module, not a function")
    assert "-x" not in models.SOURCES


def test_unknown_name_lists_the_exit_trained_suffix():
    with pytest.raises(ModelNotAvailableError, match=r"suffix -ee \(smollm2-135m-ee\): fine-tuned to exit early"):
        load_model("smollm3-1b")


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", torch.bfloat16),
    ({"avx2", "avx512f"}, "AVX512", torch.float32),
    ({"avx2"}, "AMX", torch.bfloat16),
])
def test_default_dtype_follows_the_cpu_facts_of_precision(monkeypatch, flags, capability, expected):
    monkeypatch.delenv(models.DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert models.default_dtype() is expected and models.cpu_supports_bfloat16() is (expected is torch.bfloat16)
    assert models.dtype_report()["cpu_isa"] == ("AVX-512 BF16" if expected is torch.bfloat16 else "AVX-512")
