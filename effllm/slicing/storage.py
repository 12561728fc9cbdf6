"""Saving and loading a sliced model: the sliced shapes (:func:`sliced_layout`), one sealed folder
(:func:`save_sliced`), and the rebuild of a dense skeleton with those shapes (:func:`load_sliced`). A full-width
head (SliceGPT's default) and a sliced one round-trip alike: the layout records every layer's output width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from effllm import io, records
from effllm.adapters import get_adapter
from effllm.models import check_complete
from effllm.slicing import surgery
from effllm.slicing.counts import unique_parameters
from effllm.slicing.layers import SLICED_LAYERS, is_sliced, sliced_layer_class
from effllm.slicing.slicegpt import embeddings

SLICED_FORMAT = "effllm-sliced/2"
SLICED_KIND = "effllm-sliced"  # the effllm.io kind of a saved sliced-model folder
SLICED_WEIGHTS_FILE = "model.safetensors"


class SlicedModelError(io.ArtifactError):
    """A folder that is not a complete, consistent sliced-model folder (see :func:`load_sliced`)."""


def sliced_layout(model: nn.Module) -> dict[str, Any]:
    """The shapes a sliced model needs beyond its config: per layer d_in (attention input), d_mid (MLP
    input) and d_out (layer output), the embedding width, the norms' eps and whether the head has a bias.
    ``layers`` is None for a model whose layers are not SliceGPT layers (dense, or ShortGPT)."""
    adapter = get_adapter(model)
    head = adapter.lm_head
    layout: dict[str, Any] = {
        "model_type": model.config.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": int(model.config.hidden_size),
        "embedding_dim": int(adapter.embed_tokens.weight.shape[1]),
        "head_bias": head.bias is not None,
        "layers": None,
    }
    if not is_sliced(model):
        return layout
    layers = []
    for i in range(adapter.num_layers):
        layer, norms = adapter.layer(i), adapter.norms(i)
        if not isinstance(layer, SLICED_LAYERS):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, not a sliced layer: a partly sliced model.")
        layers.append({
            "d_in": int(layer.attn_shortcut.in_features),
            "d_mid": int(layer.attn_shortcut.out_features),
            "d_out": int(layer.mlp_shortcut.out_features),
            "norm_eps": [surgery.norm_eps(norms["attention"]), surgery.norm_eps(norms["mlp"])],
        })
    layout["layers"] = layers
    layout["final_norm_eps"] = surgery.norm_eps(adapter.final_norm)
    return layout


def save_sliced(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a model sliced by :func:`slice_model` (SliceGPT or ShortGPT): its config (``config.json``), weights
    (``model.safetensors``), the tokenizer if given, and in the folder's seal the sliced shapes of
    :func:`sliced_layout` (norm eps included), the slicing settings and the dtype. One checksum covers every
    file and the seal (effllm.io): an edited config or a swapped weights file is refused on loading. The folder
    appears whole, in one rename, or not at all; an existing one is replaced only when it is empty or an
    earlier saved sliced model. :func:`load_sliced` rebuilds the model."""
    from safetensors.torch import save_model

    check_complete(model, "save this model")
    get_adapter(model)  # a supported family, or a clear error
    layout = sliced_layout(model)
    folder = io.check_replaceable(Path(folder), SLICED_KIND)
    info = {
        "format": SLICED_FORMAT,
        "layout": layout,
        "settings": records.SLICING.get(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "parameters": unique_parameters(model),
    }
    with io.staging(folder) as staging:
        model.config.save_pretrained(staging)
        save_model(model, str(staging / SLICED_WEIGHTS_FILE))  # handles tied tensors (ShortGPT keeps its tied head)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        io.seal(staging, SLICED_KIND, info)
    return folder


def _empty_linear(linear: nn.Linear, d_in: int | None = None, d_out: int | None = None, bias: bool = False) -> nn.Linear:
    """A linear of the new shape (weights to be loaded), on the old one's dtype and device."""
    out_features, in_features = linear.weight.shape
    new = nn.Linear(in_features if d_in is None else d_in, out_features if d_out is None else d_out,
                    bias=bias or linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    return new.requires_grad_(False)


def _build_sliced_skeleton(model: nn.Module, layout: dict[str, Any]) -> None:
    """Give a freshly built dense model the shapes of ``layout`` (weights are loaded afterwards)."""
    adapter = get_adapter(model)
    layer_class = sliced_layer_class(model)
    like = adapter.embed_tokens.weight
    for embedding in embeddings(model, adapter):
        embedding.weight = nn.Parameter(like.new_empty(embedding.weight.shape[0], layout["embedding_dim"]),
                                        requires_grad=False)
        embedding.embedding_dim = layout["embedding_dim"]
    for i, shape in enumerate(layout["layers"]):
        d_in, d_mid, d_out = shape["d_in"], shape["d_mid"], shape["d_out"]
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        for name in ("q", "k", "v"):
            surgery.replace_module(model, attention[name], _empty_linear(attention[name], d_in=d_in))
        surgery.replace_module(model, attention["o"], _empty_linear(attention["o"], d_out=d_mid))
        for name, linear in mlp.items():
            surgery.replace_module(model, linear,
                                   _empty_linear(linear, **({"d_out": d_out} if name == "down" else {"d_in": d_mid})))
        eps_attention, eps_mlp = shape["norm_eps"]
        surgery.replace_module(model, norms["attention"], nn.RMSNorm(d_in, eps=eps_attention, dtype=like.dtype))
        surgery.replace_module(model, norms["mlp"], nn.RMSNorm(d_mid, eps=eps_mlp, dtype=like.dtype))
        adapter.layers[i] = layer_class(adapter.layer(i), surgery.shortcut(torch.zeros(d_in, d_mid), like),
                                        surgery.shortcut(torch.zeros(d_mid, d_out), like))
    d_last = layout["layers"][-1]["d_out"]  # the head's width: D, or d_{L-1} for a sliced head
    surgery.replace_module(model, adapter.final_norm,
                           nn.RMSNorm(d_last, eps=layout["final_norm_eps"], dtype=like.dtype))
    head = adapter.lm_head
    surgery.replace_module(model, head, _empty_linear(head, d_in=d_last, bias=layout["head_bias"]))


def load_sliced(folder: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_sliced` (eval mode; the tokenizer, if saved, loads with
    ``AutoTokenizer.from_pretrained(folder)``). A folder that is not sealed (missing, cut short, or saved by an
    older effllm), any file that was changed, removed or added since (weights, ``config.json``, tokenizer,
    the seal itself), or weights that do not fit the recorded shapes raise :class:`SlicedModelError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        info = io.verify(folder, SLICED_KIND)
    except io.ArtifactError as error:
        raise SlicedModelError(f"{error} (a sliced model is saved by effllm.slicing.save_sliced)") from None
    try:
        layout = info["layout"]
        dtype = getattr(torch, info["dtype"])
    except (KeyError, TypeError, AttributeError) as error:
        raise SlicedModelError(f"{folder}: the seal's metadata is incomplete ({error!r}).") from error
    if info.get("format") != SLICED_FORMAT:
        raise SlicedModelError(f"{folder} has format {info.get('format')!r}; this effllm reads {SLICED_FORMAT!r}.")
    config = AutoConfig.from_pretrained(folder)
    if (config.model_type, config.num_hidden_layers) != (layout["model_type"], layout["num_layers"]):
        raise SlicedModelError(
            f"{folder}: config.json describes a {config.model_type} with {config.num_hidden_layers} layers, the "
            f"seal a {layout['model_type']} with {layout['num_layers']}: the files do not belong together."
        )
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if layout["layers"] is not None:
        _build_sliced_skeleton(model, layout)
    try:
        load_model(model, str(folder / SLICED_WEIGHTS_FILE), strict=True)
    except (RuntimeError, SafetensorError) as error:
        raise SlicedModelError(f"{folder}: the weights do not fit the recorded shapes ({error}).") from error
    if info.get("settings") is not None:
        records.SLICING.set(model, info["settings"])
    if device is not None:
        model = model.to(device)
    return model.eval()
