"""Full-depth outputs computed once (issue 25 item 4): effllm.experiments.reference_cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from effllm.decoding.batched import decode_rows
from effllm.decoding.core import decode
from effllm.decoding.policies import Full
from effllm.experiments import reference_cache as rc
from effllm.models import tiny_model

LIMIT = 6


@pytest.fixture(scope="module")
def llama():
    model, _ = tiny_model("llama")
    return model


def _prompts(model, lengths=(5, 3, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (1, n), generator=generator) for n in lengths]


class Counter:
    """decode_rows as reference_cache calls it, counting the calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        monkeypatch.setattr(rc, "decode_rows", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return decode_rows(*args, **kwargs)


def _forbid(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decode_rows called on a cache hit")

    monkeypatch.setattr(rc, "decode_rows", fail)


def _assert_same(cached, fresh):
    assert len(cached) == len(fresh)
    for a, b in zip(cached, fresh, strict=True):
        assert torch.equal(a.sequences, b.sequences)
        assert torch.equal(a.exit_layers, b.exit_layers) and torch.equal(a.num_layers_run, b.num_layers_run)
        assert a.num_layers == b.num_layers and a.policy == b.policy == Full()
        assert a.eos_token_ids == b.eos_token_ids and a.layers_run == b.layers_run
        assert a.confidences == b.confidences and a.confidence_flops == b.confidence_flops
        assert a.avg_layers == b.avg_layers == a.num_layers


def _an_eos(model, prompts):
    """A token the model emits in the middle of the first answer, so answers end early at it."""
    return int(decode(model, prompts[0], LIMIT, Full(), eos_token_id=[]).new_tokens()[0, 2])


def test_a_hit_returns_what_decoding_afresh_gives_without_decoding(llama, tmp_path, monkeypatch):
    prompts = _prompts(llama)
    eos = _an_eos(llama, prompts)
    counter = Counter(monkeypatch)
    first = rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=eos, batch_size=2, cache_dir=tmp_path)
    assert counter.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    # the batch size is part of the key (in bfloat16 a row's arithmetic depends on its batch's padding): another
    # batch size decodes afresh into an entry of its own, the same one reads back
    rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=eos, batch_size=3, cache_dir=tmp_path)
    assert counter.calls == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
    _forbid(monkeypatch)
    cached = rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=eos, batch_size=3, cache_dir=tmp_path)
    fresh = decode_rows(llama, prompts, LIMIT, Full(), eos_token_id=eos)
    _assert_same(cached, fresh)
    _assert_same(first, fresh)
    answer = cached[0].new_tokens()[0]
    assert answer[-1] == eos and answer.shape[0] <= 3 < LIMIT  # ended at its first end of sequence
    for prompt, output in zip(prompts, cached, strict=True):  # each as decoding it alone
        assert torch.equal(output.sequences, decode(llama, prompt, LIMIT, Full(), eos_token_id=eos).sequences)
    # the model's own end of sequence (eos_token_id None) and the same id given explicitly share one entry
    default_eos = llama.generation_config.eos_token_id
    monkeypatch.setattr(rc, "decode_rows", decode_rows)
    rc.cached_full_depth(llama, prompts, LIMIT, cache_dir=tmp_path)
    _forbid(monkeypatch)
    rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=default_eos, cache_dir=tmp_path)


def test_full_depth_ignores_the_exit_transform(llama, tmp_path, monkeypatch):
    """exit_transform is no part of the key: at layer L the head reads the state unchanged."""
    prompts = _prompts(llama)
    def scramble(layer, hidden):
        return -hidden * 3.0

    fresh = decode_rows(llama, prompts, LIMIT, Full(), eos_token_id=[], exit_transform=scramble)
    _assert_same(fresh, decode_rows(llama, prompts, LIMIT, Full(), eos_token_id=[]))
    rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path)
    _forbid(monkeypatch)
    _assert_same(rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], exit_transform=scramble,
                                      cache_dir=tmp_path), fresh)
    with pytest.raises(ValueError, match="exit_transform"):  # the argument is checked on a hit too
        rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], exit_transform="lens", cache_dir=tmp_path)


def _pruned(model):
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        weight = pruned.model.layers[0].mlp.down_proj.weight
        weight[weight.abs() < weight.abs().median()] = 0.0  # what pruning changes: not embeddings or norms
    return pruned


@pytest.mark.parametrize("change", ["prompt", "limit", "eos", "dtype", "weight"])
def test_a_changed_prompt_limit_eos_dtype_or_weight_misses(llama, tmp_path, monkeypatch, change):
    prompts = _prompts(llama)
    rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path)
    model, limit, eos = llama, LIMIT, []
    if change == "prompt":
        prompts = [*prompts[:2], torch.cat([prompts[2][:, :-1], (prompts[2][:, -1:] + 1) % 50], dim=1)]
    elif change == "limit":
        limit = LIMIT + 1
    elif change == "eos":
        eos = [_an_eos(llama, prompts)]
    elif change == "dtype":
        model = copy.deepcopy(llama).to(torch.bfloat16)
    else:
        model = _pruned(llama)
    counter = Counter(monkeypatch)
    outputs = rc.cached_full_depth(model, prompts, limit, eos_token_id=eos, cache_dir=tmp_path)
    assert counter.calls == 1 and len(list(tmp_path.glob("*.safetensors"))) == 2
    _assert_same(outputs, decode_rows(model, prompts, limit, Full(), eos_token_id=eos))
    rc.cached_full_depth(model, prompts, limit, eos_token_id=eos, cache_dir=tmp_path)
    assert counter.calls == 1  # and now that one hits


def test_weights_fingerprint_sees_what_the_identity_fingerprint_does_not(llama):
    from effllm.models.identity import fingerprint

    pruned = _pruned(llama)
    assert fingerprint(pruned) == fingerprint(llama)  # embeddings and norms only
    assert rc.weights_fingerprint(pruned) != rc.weights_fingerprint(llama)
    assert rc.weights_fingerprint(copy.deepcopy(llama)) == rc.weights_fingerprint(llama)


@pytest.mark.parametrize("damage", ["tensor bytes", "sidecar", "other entry"])
def test_a_corrupt_or_mismatching_file_is_rebuilt_with_a_warning(llama, tmp_path, monkeypatch, damage):
    prompts = _prompts(llama)
    rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    sidecar = path.with_name(path.name + ".json")
    if damage == "tensor bytes":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "sidecar":
        meta = json.loads(sidecar.read_text())
        meta["meta"]["num_layers"] += 1
        sidecar.write_text(json.dumps(meta))
    else:  # a whole, checksummed entry of other prompts under this key's name
        other = rc.cached_full_depth(llama, _prompts(llama, (4, 4, 4), seed=1), LIMIT, eos_token_id=[],
                                     cache_dir=tmp_path / "other")
        assert other
        (other_path,) = (tmp_path / "other").glob("*.safetensors")
        path.write_bytes(other_path.read_bytes())
        sidecar.write_bytes(other_path.with_name(other_path.name + ".json").read_bytes())
    counter = Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match="unusable"):
        outputs = rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path)
    assert counter.calls == 1
    _assert_same(outputs, decode_rows(llama, prompts, LIMIT, Full(), eos_token_id=[]))
    _forbid(monkeypatch)  # replaced: the next call hits, quietly
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(rc.cached_full_depth(llama, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path), outputs)


def test_an_encoder_decoder_hit_starts_with_the_decoder_start_token(tmp_path, monkeypatch):
    model, _ = tiny_model("t5", num_layers=2)
    prompts = _prompts(model, (4, 6))
    fresh = decode_rows(model, prompts, LIMIT, Full(), eos_token_id=[])
    rc.cached_full_depth(model, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path)
    _forbid(monkeypatch)
    _assert_same(rc.cached_full_depth(model, prompts, LIMIT, eos_token_id=[], cache_dir=tmp_path), fresh)


def test_default_folder_is_under_the_cache(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    rc.cached_full_depth(llama, _prompts(llama, (3,)), 2, eos_token_id=[])
    assert len(list((tmp_path / rc.FOLDER).glob("*.safetensors"))) == 1
