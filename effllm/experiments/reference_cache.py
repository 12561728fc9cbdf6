"""Full-depth outputs computed once (issue 25 item 4): the reference every quality number is measured against.

    references = cached_full_depth(model, [p.input_ids for p in prompts], 48, batch_size=32)
    references[i]   # the DecodeOutput of prompt i at full depth, as decode_rows(..., Full()) gives it

Every notebook of a run compares its policies with the same model's full-depth answers to the same prompts; this
decodes them once (:func:`effllm.decoding.batched.decode_rows` with :class:`~effllm.decoding.policies.Full`) and
keeps each prompt's new token ids on disk, under ``effllm.paths.cache_dir() / "full_depth"``, one checksummed
tensor file (:func:`effllm.io.save_tensors`) per key. The key is a SHA-256 over what decides the tokens:

- the model: its class, its config (less its path and library version) and a fingerprint of *every* weight and
  buffer, so a pruned, sliced or retrained model never meets the dense model's entry (the identity fingerprint
  of :mod:`effllm.models.identity` covers only the weights pruning leaves alone: not enough here);
- its dtype, its device type and the autocast in force;
- every prompt's ids, the answer limit ``max_new_tokens`` and the end-of-sequence ids decoding stops at (as
  ``decode`` resolves them: the model's when ``eos_token_id`` is None);
- :data:`FORMAT_VERSION`.

``exit_transform`` is not in it: at full depth every prediction reads layer L, whose state goes to the final norm
and head unchanged (``effllm.decoding.exits.exit_logits`` applies a transform only below the last layer), so the
tokens do not depend on it. A file that is corrupt, of another key or inconsistent with its key is reported with
a warning, decoded again and replaced; it is never partly used. An output read back was not decoded now: its
``prefill_seconds`` and ``decode_seconds`` are nan (time the full model with run_policies, not from here).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from effllm import checks, io, paths
from effllm.decoding.batched import decode_rows
from effllm.decoding.core import DecodeOutput, eos_ids
from effllm.decoding.exits import resolve_exit_transform
from effllm.decoding.policies import Full
from effllm.models.identity import _stored_tensor, check_complete

__all__ = ["FOLDER", "FORMAT_VERSION", "KIND", "cache_key", "cached_full_depth", "weights_fingerprint"]

FORMAT_VERSION = 1
KIND = "full-depth outputs"
FOLDER = "full_depth"
# Config entries that say where a model came from, not what it computes.
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 of every parameter and buffer of ``model`` (names, shapes, dtypes and bytes): any change to
    any weight (pruning's zeros, slicing, training) gives another fingerprint. Offloaded weights are read from
    accelerate's store; a sparse tensor is hashed as its dense value."""
    digest = hashlib.sha256()
    for prefix, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor is None:
                continue
            value = _stored_tensor(module, name, tensor).detach()
            if value.layout != torch.strided:
                value = value.to_dense()
            digest.update(f"{prefix}.{name}:{tuple(value.shape)}:{value.dtype}\n".encode())
            digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _config_identity(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return ""
    settings = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
    settings["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(settings, sort_keys=True, default=str)


def _precision(model: torch.nn.Module) -> dict[str, Any]:
    """The model's dtype (its first parameter's; every parameter's dtype is in the weights fingerprint), its device
    type and the autocast in force there."""
    first = next(model.parameters())
    device_type = first.device.type
    autocast = None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        autocast = str(torch.get_autocast_dtype(device_type))
    return {"dtype": str(first.dtype), "device_type": device_type, "autocast": autocast}


def _prompts_digest(prompts: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        ids = prompt.detach().reshape(-1).to(device="cpu", dtype=torch.long).contiguous()
        digest.update(f"{ids.numel()}:".encode())
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: torch.nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
              eos: Sequence[int], batch_size: int = 16) -> tuple[str, dict[str, Any]]:
    """``(hex SHA-256, what it was computed over)`` for the full-depth outputs of ``model`` on ``prompts``.
    ``batch_size`` is part of it: in bfloat16 a row's arithmetic depends on its batch's padding, so the reference
    is the one decoded in the batches the settings it is compared with decode in (float32 gives the same either
    way)."""
    identity = {
        "format": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": hashlib.sha256(_config_identity(model).encode()).hexdigest(),
        "weights": weights_fingerprint(model),
        **_precision(model),
        "prompts": _prompts_digest(prompts),
        "n_prompts": len(prompts),
        "max_new_tokens": int(max_new_tokens),
        "eos_token_ids": [int(e) for e in eos],
        "batch_size": int(batch_size),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest(), identity


def _prefix(model: torch.nn.Module, prompt: torch.Tensor) -> torch.LongTensor:
    """What a sequence starts with: the prompt, or T5's decoder start token."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        start = model.generation_config.decoder_start_token_id
        return torch.tensor([[start]], dtype=torch.long, device=prompt.device)
    return prompt.reshape(1, -1).long()


def _rebuild(model: torch.nn.Module, prompt: torch.Tensor, new: torch.LongTensor, num_layers: int,
             eos: tuple[int, ...]) -> DecodeOutput:
    """The DecodeOutput decode gives at full depth for ``prompt`` with new ids ``new`` [n]."""
    n = int(new.shape[0])
    new = new.to(device=prompt.device, dtype=torch.long).reshape(1, n)
    layers = torch.full((1, n), num_layers, dtype=torch.long, device=prompt.device)
    return DecodeOutput(
        sequences=torch.cat([_prefix(model, prompt), new], dim=1), exit_layers=layers, num_layers_run=layers.clone(),
        confidences=[[] for _ in range(n)], thresholds=[math.nan] * n, confidence_flops=[0] * n,
        confidence_seconds=[0.0] * n, layers_run=[tuple(range(num_layers))] * n, num_layers=num_layers,
        policy=Full(), prefill_seconds=math.nan, decode_seconds=math.nan, eos_token_ids=eos)


def _check_entry(tensors: dict[str, torch.Tensor], meta: dict[str, Any], key: str, n_prompts: int,
                 max_new_tokens: int, num_layers: int, eos: tuple[int, ...]) -> list[int]:
    """The answer lengths of a loaded entry; raises ValueError (saying what is wrong) unless it is whole and
    consistent with ``key``: every answer 1..max_new_tokens tokens, ending at its first end of sequence or at
    the limit."""
    if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"it holds key {meta.get('key')!r} (format {meta.get('format')!r}), not {key}")
    if meta.get("num_layers") != num_layers or tuple(meta.get("eos_token_ids", ())) != eos:
        raise ValueError("its depth or end-of-sequence ids differ from the model's")
    if set(tensors) != {"new_ids", "lengths"}:
        raise ValueError(f"it holds tensors {sorted(tensors)}, not new_ids and lengths")
    ids, lengths = tensors["new_ids"], tensors["lengths"].tolist()
    if ids.dim() != 1 or len(lengths) != n_prompts or sum(lengths) != ids.numel():
        raise ValueError(f"it holds {len(lengths)} answers of {sum(lengths)} ids in all, for {n_prompts} prompts "
                         f"and {ids.numel()} ids")
    stops = set(eos)
    for i, answer in enumerate(torch.split(ids, lengths)):
        tokens = answer.tolist()
        ended = bool(tokens) and tokens[-1] in stops
        if not 1 <= len(tokens) <= max_new_tokens or stops & set(tokens[:-1]) or (
                not ended and len(tokens) != max_new_tokens):
            raise ValueError(f"answer {i} ({len(tokens)} ids) is not a full-depth answer of at most "
                             f"{max_new_tokens} ids ending at its first end of sequence")
    return lengths


def _load(path: Path, model, prompts, key: str, max_new_tokens: int, num_layers: int,
          eos: tuple[int, ...]) -> list[DecodeOutput] | None:
    """The cached outputs, or None (a warning said why when a file was there but unusable)."""
    sidecar = path.with_name(path.name + ".json")
    if not path.exists() and not sidecar.exists():
        return None
    try:
        tensors, meta = io.load_tensors(path, KIND)
        lengths = _check_entry(tensors, meta, key, len(prompts), max_new_tokens, num_layers, eos)
    except (io.ArtifactError, ValueError, KeyError, TypeError, OSError, RuntimeError) as error:
        warnings.warn(f"full-depth cache entry {path} is unusable ({error}); decoding the full-depth outputs "
                      "again and replacing it", RuntimeWarning, stacklevel=3)
        return None
    answers = torch.split(tensors["new_ids"], lengths)
    return [_rebuild(model, p, a, num_layers, eos) for p, a in zip(prompts, answers, strict=True)]


def _store(path: Path, outputs: list[DecodeOutput], identity: dict[str, Any], key: str, num_layers: int,
           eos: tuple[int, ...]) -> None:
    news = [o.new_tokens()[0].detach().to("cpu", torch.long) for o in outputs]
    tensors = {"new_ids": torch.cat(news), "lengths": torch.tensor([n.numel() for n in news], dtype=torch.long)}
    meta = {**identity, "key": key, "num_layers": num_layers, "eos_token_ids": list(eos)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        io.save_tensors(path, tensors, meta, KIND)
    except OSError as error:  # a read-only cache costs the reuse, not the run
        warnings.warn(f"could not save the full-depth outputs to {path} ({error}); they are not cached",
                      RuntimeWarning, stacklevel=3)


def cached_full_depth(model: torch.nn.Module, prompts: Sequence[torch.LongTensor], max_new_tokens: int, *,
                      eos_token_id: int | Sequence[int] | None = None, batch_size: int = 32,
                      exit_transform: Any = None, cache_dir: str | Path | None = None) -> list[DecodeOutput]:
    """One full-depth :class:`DecodeOutput` per prompt ([1, p] id tensors), as ``decode_rows(model, prompts,
    max_new_tokens, Full(), ...)`` gives it, decoded once per (model, dtype, prompts, answer limit, end of
    sequence) and read back from ``cache_dir`` (default ``effllm.paths.cache_dir() / "full_depth"``) afterwards.
    ``exit_transform`` is passed on but is no part of the key (full depth never applies it)."""
    checks.positive_int("max_new_tokens", max_new_tokens)
    checks.positive_int("batch_size", batch_size)
    if not len(prompts):
        raise ValueError("prompts is empty; give at least one [1, p] id tensor")
    check_complete(model, "decode")  # as decode would: a half-pruned model gives no tokens, cached or not
    resolve_exit_transform(model, exit_transform)  # the same argument errors as decode, hit or miss
    from effllm.adapters import get_adapter

    num_layers = get_adapter(model).num_layers
    eos = tuple(int(e) for e in eos_ids(model, eos_token_id).tolist())
    key, identity = cache_key(model, prompts, max_new_tokens, eos, batch_size)
    folder = Path(cache_dir) if cache_dir is not None else paths.cache_dir() / FOLDER
    path = folder / f"{key}.safetensors"
    cached = _load(path, model, prompts, key, max_new_tokens, num_layers, eos)
    if cached is not None:
        return cached
    outputs = decode_rows(model, prompts, max_new_tokens, Full(), batch_size=batch_size, eos_token_id=eos_token_id,
                          exit_transform=exit_transform)
    _store(path, outputs, identity, key, num_layers, eos)
    return outputs
