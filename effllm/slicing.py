"""Dynamic slicing by layer redundancy (Dumitru et al. 2024) on top of SliceGPT (Ashkboos et al. 2024),
and ShortGPT layer removal (Men et al. 2024) as the baseline on the same layer scores.

    scores = layer_scores(model, calibration_ids, kind="lr")        # [L], 1 = most redundant layer
    fractions = slice_fractions(scores, mean=0.25, amplitude=0.1)   # [L], mean exactly 0.25
    model = slice_model(model, calibration_ids, fractions=fractions)
    model = slice_model(model, calibration_ids, mean=0.25)          # constant SliceGPT
    model = slice_model(model, calibration_ids, mean=0.25, method="shortgpt")  # drop 25% of the layers
    save_sliced(model, "out/smollm2-sliced-25"); model = load_sliced("out/smollm2-sliced-25")
    table = compare_methods(model, calibration_ids, [0.1, 0.2], 0.1, evaluate)  # constant / dynamic / ShortGPT

Parameter counts without slicing anything (for comparisons at equal size):

    sliced_parameter_count(model, fractions)      # what SliceGPT with these fractions leaves
    shortgpt_parameter_count(model, n_remove)     # what removing n_remove layers leaves
    equal_parameter_shortgpt_layers(model, fractions=[0.25] * 30)   # ShortGPT layers to remove for the same size

SliceGPT in five steps (PAPERS.md E), all rotations computed in float64:

1. Untie the LM head and fold every norm's scale (and, for OPT, its bias) into the linears it feeds,
   so that each norm becomes a plain RMSNorm, which commutes with orthogonal maps:
   RMSNorm(x Q) = RMSNorm(x) Q. OPT's LayerNorm first needs a zero-mean residual stream: the
   embeddings and every linear that writes to the residual (out_proj, fc2) are centred, after which
   LayerNorm equals RMSNorm (the SliceGPT paper, section 3.2).
2. Layer by layer (the shared :class:`effllm.capture.LayerByLayer` loop), the PCA of the signal at
   the attention input, between attention and MLP, and at the layer output: C = sum over tokens of
   x^T x, eigenvectors by descending eigenvalue. Each PCA is taken on the signal of the model whose
   lower layers are already sliced, as in the reference implementation (TransformerCompression).
3. Rotate: embeddings and input-side linears (q, k, v; gate, up; fc1) by Q, output-side linears
   (o, down; out_proj, fc2) by Q^T. Where the basis changes (attention input -> MLP input -> next
   layer's input), the residual stream goes through a shortcut matrix Q_a^T Q_b.
4. Slice: keep the first d_l = round((1 - p_l) D) principal directions of layer l's input and middle
   signal; its output keeps the next layer's d_{l+1} directions.
5. The shortcut matrices are small ``nn.Linear`` modules on the residual path, so each decoder layer
   is replaced by a :class:`SlicedLlamaLayer` / :class:`SlicedOPTLayer` that holds the original
   (now smaller) submodules under their original names and adds the shortcuts. The adapter, the
   HF ``model(ids)`` forward, ``generate`` and the KV cache keep working.

A norm over d < D dimensions divides by sqrt(sum x^2 / d) where the original divided by
sqrt(sum x^2 / D); the sliced norms are ``torch.nn.RMSNorm(d)`` with weight sqrt(D / d) and eps * d / D,
which is the original RMSNorm over D exactly (TransformerCompression writes its own norm for this).

Parameter cost to know about: a tied LM head must be untied (the embeddings live in layer 0's basis,
the head in the last layer's), which adds V * d parameters, and every layer gains d_l^2 + d_l d_{l+1}
of shortcuts. SmolLM2-135M sliced 25% everywhere keeps 133.3 M of its 134.5 M parameters: the decoder
layers shrink 106.2 M -> 90.8 M, the separate head adds 21.2 M. Dynamic fractions with the same mean
M do not give the same parameter count (the shortcuts are quadratic in d, and the embeddings follow
layer 0's fraction and the head the last layer's).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from effllm import io, records
from effllm.adapters import ArchitectureAdapter, UnsupportedArchitectureError, get_adapter
from effllm.capture import LayerByLayer, capture_inputs, check_calibration
from effllm.models import check_complete, mark_incomplete

SLICEGPT_FAMILIES = ("llama", "mistral", "qwen2", "opt")
SHORTGPT_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text", "opt")
SLICED_FORMAT = "effllm-sliced/2"
SLICED_KIND = "effllm-sliced"  # the effllm.io kind of a saved sliced-model folder
SLICED_WEIGHTS_FILE = "model.safetensors"


class SlicedModelError(io.ArtifactError):
    """A folder that is not a complete, consistent sliced-model folder (see :func:`load_sliced`)."""


# --------------------------------------------------------------------------------------------------
# Layer scores


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector (nothing to rank) maps to zeros."""
    spread = values.max() - values.min()
    if spread == 0:
        return torch.zeros_like(values)
    return (values - values.min()) / spread


@torch.no_grad()
def layer_scores(
    model: nn.Module, calibration: torch.Tensor, kind: Literal["lr", "bi"] = "lr", batch_size: int = 8
) -> torch.Tensor:
    """One score per decoder layer from the cosine between its input and output states, float64 [L].

    ``kind="lr"``: Layer Redundancy, v_i = 1 - minmax(sum over tokens of (1 - cos(h_{i-1}, h_i))), so
    1 marks the most redundant layer (the one that changes its input least). ``kind="bi"``: ShortGPT's
    Block Influence, BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}); low BI = little influence.
    """
    if kind not in ("lr", "bi"):
        raise ValueError(f"kind must be 'lr' (layer redundancy) or 'bi' (block influence); got {kind!r}.")
    check_calibration(model, calibration)
    runner = LayerByLayer(model, calibration, batch_size=batch_size)
    distance = torch.zeros(runner.num_layers, dtype=torch.float64)  # sum over tokens of (1 - cos)
    n_tokens = sum(state.shape[0] * state.shape[1] for state in runner.states)
    for i in range(runner.num_layers):
        outputs = runner.run(i)
        for before, after in zip(runner.states, outputs, strict=True):
            cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
            distance[i] += (1 - cos).sum()
        runner.advance(i, outputs)
    if kind == "bi":
        return distance / n_tokens
    return 1 - _minmax(distance)


def slice_fractions(scores: torch.Tensor, mean: float, amplitude: float) -> torch.Tensor:
    """Per-layer slice fractions p_i = (M - A) + A * u_i / mean(u), u = minmax(scores), float64 [L].

    mean(p) = M by construction; ``amplitude`` A = 0 is constant slicing. The more redundant a layer
    (higher score), the more of it is sliced. All-equal scores give constant slicing.
    """
    _check_mean(mean)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor (one per layer); got shape {tuple(scores.shape)}.")
    if amplitude < 0:
        raise ValueError(f"amplitude must be >= 0 (0 = constant slicing); got {amplitude}.")
    u = _minmax(scores)
    if amplitude == 0 or u.mean() == 0:
        return torch.full_like(u, float(mean))
    fractions = (mean - amplitude) + amplitude * u / u.mean()
    if fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError(
            f"mean={mean}, amplitude={amplitude} give slice fractions from {fractions.min():.4f} to "
            f"{fractions.max():.4f}; every fraction must lie in [0, 1). Use a smaller amplitude "
            f"(at most mean={mean} keeps the least redundant layer at >= 0)."
        )
    return fractions


# --------------------------------------------------------------------------------------------------
# Input checks (all before anything is modified)


def _check_mean(mean: float) -> None:
    if not 0 <= mean < 1:
        raise ValueError(f"mean slice fraction M must be in [0, 1); got {mean}. M = 0.25 slices 25%.")


def _is_sliced(model: nn.Module) -> bool:
    return any(isinstance(m, (SlicedLlamaLayer, SlicedOPTLayer)) for m in model.modules())


def _check_family(model: nn.Module, method: str) -> ArchitectureAdapter:
    allowed = SLICEGPT_FAMILIES if method == "slicegpt" else SHORTGPT_FAMILIES
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in allowed:
        raise UnsupportedArchitectureError(
            f"{method} supports model types {', '.join(allowed)}; got {model_type!r}. "
            + ("Gemma 3's sandwich norms (a norm on each branch output) are not foldable into a rotation. "
               if model_type == "gemma3_text" and method == "slicegpt" else "")
            + "Use a supported model (e.g. smollm2-135m or tiny-llama)."
        )
    adapter = get_adapter(model)
    if _is_sliced(model):
        raise ValueError(
            "This model is already sliced with SliceGPT (its layers carry shortcut matrices); slicing it again "
            "is not supported. Slice the original model with the fractions you want instead."
        )
    if model_type == "opt" and method == "slicegpt":
        decoder = adapter.decoder
        if not model.config.do_layer_norm_before or decoder.project_in is not None or decoder.project_out is not None:
            raise UnsupportedArchitectureError(
                "SliceGPT needs a pre-norm OPT without project_in/project_out (opt-350m is post-norm and "
                "projects its embeddings); use another OPT size."
            )
    return adapter




def sliced_dims(fractions: torch.Tensor | list[float], hidden_size: int) -> list[int]:
    """Kept dimensions d_l = round((1 - p_l) * D) per layer, after checking every fraction."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    if fractions.dim() != 1:
        raise ValueError(f"fractions must be a 1-D vector (one per layer); got shape {tuple(fractions.shape)}.")
    bad = [(i, float(p)) for i, p in enumerate(fractions) if not 0 <= p < 1]
    if bad:
        raise ValueError(f"slice fractions must be in [0, 1) (0 = keep every dimension); got {bad} (layer, fraction).")
    dims = [round((1 - float(p)) * hidden_size) for p in fractions]
    empty = [i for i, d in enumerate(dims) if d < 1]
    if empty:
        raise ValueError(
            f"fractions leave layers {empty} no dimension of the {hidden_size} (d = round((1 - p) * D) = 0); "
            "use smaller fractions for them."
        )
    return dims


# --------------------------------------------------------------------------------------------------
# Sliced decoder layers: the original submodules plus the residual shortcut matrices


class SlicedLlamaLayer(nn.Module):
    """A Llama-family decoder layer whose residual stream changes basis (and width) twice:
    [.., d_in] --attn_shortcut--> [.., d_mid] --mlp_shortcut--> [.., d_out]."""

    def __init__(self, layer: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.attn_shortcut = attn_shortcut
        self.mlp_shortcut = mlp_shortcut
        if hasattr(layer, "attention_type"):  # read by some HF model forwards to pick the mask
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = self.attn_shortcut(hidden_states) + attended
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SlicedOPTLayer(nn.Module):
    """An OPT (pre-norm) decoder layer with residual shortcut matrices, as :class:`SlicedLlamaLayer`."""

    def __init__(self, layer: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear):
        super().__init__()
        self.self_attn = layer.self_attn
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        self.fc1 = layer.fc1
        self.fc2 = layer.fc2
        self.final_layer_norm = layer.final_layer_norm
        self.activation_fn = layer.activation_fn
        self.attn_shortcut = attn_shortcut
        self.mlp_shortcut = mlp_shortcut
        self.do_layer_norm_before = True  # read by effllm.adapters (append_kv); SliceGPT needs pre-norm OPT

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        kwargs.pop("use_cache", None)  # OPT's attention does not take it
        attended, _ = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = self.attn_shortcut(hidden_states) + attended
        mlp_out = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        return self.mlp_shortcut(hidden_states) + mlp_out


# --------------------------------------------------------------------------------------------------
# Weight surgery helpers (float64 arithmetic, results cast back to the parameter's dtype)


def _set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype, device = module.weight.dtype, module.weight.device
    module.weight = nn.Parameter(weight.to(dtype=dtype, device=device), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype=dtype, device=device), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Fold a norm's scale (and bias) into the linears that read it: W <- W diag(w), b <- b + W beta."""
    scale = norm.weight.detach().double()
    shift = getattr(norm, "bias", None)
    for linear in linears:
        weight = linear.weight.detach().double()
        bias = _bias(linear)
        if shift is not None:
            extra = weight @ shift.detach().double()
            bias = extra if bias is None else bias + extra
        _set_weight(linear, weight * scale, bias)


def _centre_output(linear: nn.Linear) -> None:
    """Make a linear that writes to the residual stream produce zero-mean outputs (OPT's LayerNorm)."""
    weight = linear.weight.detach().double()
    bias = _bias(linear)
    _set_weight(linear, weight - weight.mean(dim=0, keepdim=True), None if bias is None else bias - bias.mean())


def _rotate_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear reads x = z basis^T: W <- W basis ([out, D] @ [D, d])."""
    _set_weight(linear, linear.weight.detach().double() @ basis)


def _rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear writes z = y basis: W <- basis^T W, b <- basis^T b."""
    bias = _bias(linear)
    _set_weight(linear, basis.T @ linear.weight.detach().double(), None if bias is None else bias @ basis)


def _shortcut(matrix: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing z @ matrix ([d_a, d_b]) on the residual stream."""
    linear = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False, dtype=like.dtype, device=like.device)
    _set_weight(linear, matrix.T)
    return linear


def _rms_norm(dim: int, full_dim: int, eps: float, like: torch.Tensor) -> nn.RMSNorm:
    """RMSNorm over ``dim`` kept dimensions that equals the original RMSNorm over ``full_dim``."""
    norm = nn.RMSNorm(dim, eps=eps * dim / full_dim, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        norm.weight.fill_((full_dim / dim) ** 0.5)
    norm.weight.requires_grad_(False)
    return norm


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):  # HF RMSNorms / nn.LayerNorm, nn.RMSNorm
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    return 1e-6


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (found by identity, not by an attribute path)."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def _pca(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a float64 covariance as columns, by descending eigenvalue: Q [D, D]."""
    # One thread: a few-hundred-wide eigh is ~0.05 s single-threaded but can take seconds multi-threaded
    # when the CPU is shared (measured on the 2-core default machine), and it is never the bottleneck.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, vectors = torch.linalg.eigh(covariance)
    finally:
        torch.set_num_threads(threads)
    return vectors.flip(-1)


def _covariance(states: list[torch.Tensor]) -> torch.Tensor:
    flat = [s.reshape(-1, s.shape[-1]).double() for s in states]
    return sum(x.T @ x for x in flat)


# --------------------------------------------------------------------------------------------------
# SliceGPT


def _fuse_norms(model: nn.Module, adapter: ArchitectureAdapter, family: str) -> None:
    """Step 1: untie the head, (OPT) centre the residual stream, fold every norm into its readers."""
    head, embed = adapter.lm_head, adapter.embed_tokens
    if family == "opt" and adapter.final_norm.bias is not None and head.bias is None:
        # the final LayerNorm's bias becomes an LM-head bias: give the head one
        new_head = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                             device=head.weight.device)
        _set_weight(new_head, head.weight.detach().double().clone(), torch.zeros(head.out_features, dtype=torch.float64))
        _replace_module(model, head, new_head)
        head = new_head
    else:  # a fresh Parameter unties a head shared with the embeddings
        _set_weight(head, head.weight.detach().double().clone())
    model.config.tie_word_embeddings = False

    if family == "opt":
        for embedding in (embed, adapter.decoder.embed_positions):  # OPT's learned positions live on its decoder
            weight = embedding.weight.detach().double()
            _set_weight(embedding, weight - weight.mean(dim=1, keepdim=True))
        for i in range(adapter.num_layers):
            _centre_output(adapter.attention_projections(i)["o"])
            _centre_output(adapter.mlp_projections(i)["down"])

    for i in range(adapter.num_layers):
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        _fold_norm(norms["attention"], [attention[k] for k in ("q", "k", "v")])
        _fold_norm(norms["mlp"], [m for k, m in mlp.items() if k != "down"])
    _fold_norm(adapter.final_norm, [head])


@torch.no_grad()
def _slicegpt(model: nn.Module, calibration: torch.Tensor, dims: list[int], batch_size: int,
              where: dict[str, str]) -> nn.Module:
    """SliceGPT in place; ``where["step"]`` says how far it got (for the mark left by an interruption)."""
    adapter = get_adapter(model)
    family = "opt" if model.config.model_type == "opt" else "llama"
    full = adapter.hidden_size
    like = adapter.embed_tokens.weight
    layer_class = SlicedOPTLayer if family == "opt" else SlicedLlamaLayer
    _fuse_norms(model, adapter, family)

    where["step"] = "after folding the norms, before layer 0"
    runner = LayerByLayer(model, calibration, batch_size=batch_size)  # embeddings, original basis
    basis = _pca(_covariance(runner.states))[:, : dims[0]]  # [D, d_0]
    embeddings = [adapter.embed_tokens] + ([adapter.decoder.embed_positions] if family == "opt" else [])
    for embedding in embeddings:
        _set_weight(embedding, embedding.weight.detach().double() @ basis)
    runner.states = [(s.double() @ basis).to(s.dtype) for s in runner.states]

    for i in range(adapter.num_layers):
        where["step"] = f"at layer {i} of {adapter.num_layers} (0-based; layers before it are sliced)"
        d_in, d_mid = dims[i], dims[i]
        d_out = dims[i + 1] if i + 1 < len(dims) else dims[i]
        layer, norms = adapter.layer(i), adapter.norms(i)
        attention, mlp = adapter.attention_projections(i), adapter.mlp_projections(i)

        # (a) attention input in the sliced basis; the rest of the layer still in the original basis,
        # reached through shortcuts basis^T and the identity, so the middle signal can be measured
        _replace_module(model, norms["attention"], _rms_norm(d_in, full, _norm_eps(norms["attention"]), like))
        _replace_module(model, norms["mlp"], _rms_norm(full, full, _norm_eps(norms["mlp"]), like))
        for name in ("q", "k", "v"):
            _rotate_input(attention[name], basis)
        identity = torch.eye(full, dtype=torch.float64)
        sliced = layer_class(layer, _shortcut(basis.T, like), _shortcut(identity, like))
        adapter.layers[i] = sliced
        norms = adapter.norms(i)

        # (b) PCA between attention and MLP; rotate the attention output and the MLP input
        middle: list[torch.Tensor] = []
        with capture_inputs({"mlp": norms["mlp"]}, lambda _name, x, store=middle: store.append(x)):
            runner.run(i)
        mid_basis = _pca(_covariance(middle))[:, :d_mid]
        _rotate_output(attention["o"], mid_basis)
        sliced.attn_shortcut = _shortcut(basis.T @ mid_basis, like)
        _replace_module(model, norms["mlp"], _rms_norm(d_mid, full, _norm_eps(norms["mlp"]), like))
        for name, linear in mlp.items():
            if name != "down":
                _rotate_input(linear, mid_basis)
        sliced.mlp_shortcut = _shortcut(mid_basis.T, like)  # back to the original basis until (c)

        # (c) PCA of the layer output (original basis): the next layer's input basis
        outputs = runner.run(i)
        out_basis = _pca(_covariance(outputs))[:, :d_out]
        _rotate_output(mlp["down"], out_basis)
        sliced.mlp_shortcut = _shortcut(mid_basis.T @ out_basis, like)
        runner.advance(i, [(o.double() @ out_basis).to(o.dtype) for o in outputs])
        basis = out_basis

    where["step"] = "at the final norm and LM head (every layer is sliced)"
    final = adapter.final_norm
    _replace_module(model, final, _rms_norm(basis.shape[1], full, _norm_eps(final), like))
    _rotate_input(adapter.lm_head, basis)
    return model


# --------------------------------------------------------------------------------------------------
# ShortGPT


def _remove_layers(model: nn.Module, adapter: ArchitectureAdapter, remove: list[int]) -> None:
    """Remove the layers ``remove`` in place, or, if anything fails part-way (Ctrl-C included), put back the
    layer list, the attention layer indices and the config as they were: cheap, since the removed layers
    are still in memory until this returns."""
    layers = adapter.layers
    before = list(layers)
    attentions = [adapter.attention(i) for i in range(len(layers))]
    indices = [getattr(attention, "layer_idx", None) for attention in attentions]
    config = (model.config.num_hidden_layers, getattr(model.config, "layer_types", None))
    keep = [i for i in range(len(layers)) if i not in set(remove)]
    try:
        for i in sorted(remove, reverse=True):
            del layers[i]
        for new_index in range(len(layers)):  # KV-cache slots are indexed by layer_idx
            attention = adapter.attention(new_index)
            if hasattr(attention, "layer_idx"):
                attention.layer_idx = new_index
        model.config.num_hidden_layers = len(layers)
        if config[1] is not None:
            model.config.layer_types = [config[1][i] for i in keep]
    except BaseException:
        while len(layers):
            del layers[len(layers) - 1]
        layers.extend(before)
        for attention, index in zip(attentions, indices, strict=True):
            if index is not None:
                attention.layer_idx = index
        model.config.num_hidden_layers = config[0]
        if config[1] is not None:
            model.config.layer_types = config[1]
        raise
    finally:
        records.ADAPTER.clear(model)  # the cached adapter holds per-layer facts


# --------------------------------------------------------------------------------------------------
# Entry point


def _check_scores(scores: torch.Tensor | None, n_layers: int, kind: str) -> torch.Tensor | None:
    if scores is None:
        return None
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.shape != (n_layers,) or not torch.isfinite(scores).all():
        raise ValueError(
            f"scores must be {n_layers} finite numbers (layer_scores(model, calibration, kind={kind!r}) of this "
            f"model); got shape {tuple(scores.shape)}."
        )
    return scores


def slice_model(
    model: nn.Module,
    calibration: torch.Tensor,
    mean: float | None = None,
    fractions: torch.Tensor | list[float] | None = None,
    method: Literal["slicegpt", "shortgpt"] = "slicegpt",
    amplitude: float | None = None,
    batch_size: int = 8,
    scores: torch.Tensor | None = None,
) -> nn.Module:
    """Slice ``model`` in place with SliceGPT, or remove layers with ShortGPT, and return it.

    SliceGPT: ``fractions`` gives one slice fraction per layer (0 = keep every dimension); ``mean``
    alone slices every layer by ``mean``; ``mean`` with ``amplitude`` slices dynamically by layer
    redundancy (:func:`slice_fractions` of :func:`layer_scores` ``kind="lr"``). ShortGPT: removes the
    round(mean * L) layers of lowest Block Influence. ``calibration``: token ids [n_samples, seq_len].
    ``scores``: this model's :func:`layer_scores` (LR for dynamic slicing, BI for ShortGPT) when they are
    already computed, to save a calibration pass. Every input is checked before the model is touched.
    The settings are recorded on the model (``records.SLICING``) (and written by :func:`save_sliced`).

    All or nothing: ShortGPT puts every removed layer back if it is interrupted (Ctrl-C, an error) part-way;
    SliceGPT cannot be undone without a copy of the whole model, so an interrupted SliceGPT marks the model,
    and ``slice_model``, ``prune``, ``save_sliced`` and ``save_pruned`` refuse it with a message that says
    where it stopped (:class:`effllm.models.IncompleteModelError`): reload it.
    """
    check_complete(model, "slice this model")
    if method not in ("slicegpt", "shortgpt"):
        raise ValueError(f"method must be 'slicegpt' or 'shortgpt'; got {method!r}.")
    adapter = _check_family(model, method)
    check_calibration(model, calibration)
    n_layers = adapter.num_layers

    if method == "shortgpt":
        if mean is None or fractions is not None or amplitude is not None:
            raise ValueError("shortgpt takes mean = the fraction of layers to remove (no fractions, no amplitude).")
        _check_mean(mean)
        scores = _check_scores(scores, n_layers, "bi")
        n_remove = round(mean * n_layers)
        if n_remove >= n_layers:
            raise ValueError(f"mean={mean} removes all {n_layers} layers; use a smaller mean.")
        influence = layer_scores(model, calibration, kind="bi", batch_size=batch_size) if scores is None else scores
        remove = sorted(torch.argsort(influence, stable=True)[:n_remove].tolist())
        _remove_layers(model, adapter, remove)
        _record(model, {"method": "shortgpt", "mean": mean, "removed_layers": remove,
                        "original_num_layers": n_layers})
        return model

    if (mean is None) == (fractions is None):
        raise ValueError("give either mean (constant, or dynamic with amplitude) or fractions (one per layer), not both.")
    if fractions is None:
        _check_mean(mean)
        if amplitude is None:
            fractions = [float(mean)] * n_layers
        else:
            scores = _check_scores(scores, n_layers, "lr")
            if scores is None:
                scores = layer_scores(model, calibration, "lr", batch_size)
            fractions = slice_fractions(scores, mean, amplitude)
    elif amplitude is not None:
        raise ValueError("amplitude goes with mean (dynamic slicing); with explicit fractions leave it out.")
    if len(fractions) != n_layers:
        raise ValueError(f"fractions has {len(fractions)} entries; the model has {n_layers} layers (one each).")
    dims = sliced_dims(fractions, adapter.hidden_size)
    where = {"step": "while folding the norms into the linears"}
    try:
        _slicegpt(model, calibration, dims, batch_size, where)
    except BaseException as error:
        mark_incomplete(model, f"slicing (SliceGPT, mean {sum(dims) / len(dims) / adapter.hidden_size:.3g} of "
                               f"the width kept) was interrupted {where['step']} by {type(error).__name__}; the "
                               "model is partly sliced: reload it (effllm.models.load_model) and slice again")
        raise
    _record(model, {"method": "slicegpt", "mean": mean, "amplitude": amplitude,
                    "fractions": [float(p) for p in fractions], "dims": dims})
    return model


def _record(model: nn.Module, settings: dict[str, Any]) -> None:
    records.SLICING.set(model, settings)


# --------------------------------------------------------------------------------------------------
# Parameter counts (from the dense model's shapes; nothing is sliced)


def _linear_count(linear: nn.Linear, d_in: int | None = None, d_out: int | None = None, bias: bool = False) -> int:
    out_features, in_features = linear.weight.shape
    out_features = out_features if d_out is None else d_out
    in_features = in_features if d_in is None else d_in
    return out_features * in_features + (out_features if bias or linear.bias is not None else 0)


def _has_shift(norm: nn.Module | None) -> bool:
    return getattr(norm, "bias", None) is not None


def sliced_parameter_count(model: nn.Module, fractions: torch.Tensor | list[float]) -> int:
    """The number of parameters :func:`slice_model` with ``fractions`` would leave in this (dense) model.

    Follows the surgery step by step: embeddings (and OPT's positions) keep layer 0's d_0 columns; layer
    l's q/k/v read d_l, its attention output and MLP input live in d_l, its MLP output in d_{l+1}; every
    layer gains shortcuts d_l x d_l and d_l x d_{l+1} and two RMSNorms; the untied LM head reads the last
    d. Folding a LayerNorm's bias (OPT) gives the linears it feeds a bias.
    """
    adapter = _check_family(model, "slicegpt")
    n_layers = adapter.num_layers
    if len(fractions) != n_layers:
        raise ValueError(f"fractions has {len(fractions)} entries; the model has {n_layers} layers (one each).")
    dims = sliced_dims(fractions, adapter.hidden_size)
    total = adapter.embed_tokens.weight.shape[0] * dims[0]
    if model.config.model_type == "opt":
        total += adapter.decoder.embed_positions.weight.shape[0] * dims[0]
    for i in range(n_layers):
        d_in = d_mid = dims[i]
        d_out = dims[i + 1] if i + 1 < n_layers else dims[i]
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        total += sum(_linear_count(attention[k], d_in=d_in, bias=_has_shift(norms["attention"])) for k in "qkv")
        total += _linear_count(attention["o"], d_out=d_mid)
        total += sum(_linear_count(m, d_in=d_mid, bias=_has_shift(norms["mlp"])) for k, m in mlp.items() if k != "down")
        total += _linear_count(mlp["down"], d_out=d_out)
        total += d_in + d_mid  # the two RMSNorms
        total += d_in * d_mid + d_mid * d_out  # the two shortcut matrices
    total += dims[-1] + _linear_count(adapter.lm_head, d_in=dims[-1], bias=_has_shift(adapter.final_norm))
    return total


def _unique_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() skips shared (tied) tensors


def shortgpt_parameter_count(model: nn.Module, n_remove: int) -> int:
    """The number of parameters left after removing ``n_remove`` decoder layers (all layers of the
    supported families have the same size, so which ones does not matter)."""
    adapter = _check_family(model, "shortgpt")
    n_layers = adapter.num_layers
    if not 0 <= n_remove < n_layers:
        raise ValueError(f"n_remove must be in [0, {n_layers - 1}] (the model has {n_layers} layers); got {n_remove}.")
    sizes = {_unique_parameters(adapter.layer(i)) for i in range(n_layers)}
    if len(sizes) != 1:
        raise ValueError(f"the layers differ in size ({sorted(sizes)}); the count depends on which are removed.")
    return _unique_parameters(model) - n_remove * sizes.pop()


def equal_parameter_shortgpt_layers(
    model: nn.Module, mean: float | None = None, fractions: torch.Tensor | list[float] | None = None
) -> int:
    """How many layers ShortGPT must remove so that the model's parameter count comes as close as possible
    to SliceGPT's with ``fractions`` (or constant ``mean``): the baseline "at equal parameter count".

    Ties go to removing fewer layers. The answer can be 0: SliceGPT unties the LM head and adds shortcut
    matrices, so light slicing of a small model with a large vocabulary saves fewer parameters than one
    layer holds.
    """
    adapter = _check_family(model, "slicegpt")
    if (mean is None) == (fractions is None):
        raise ValueError("give either mean (constant slicing) or fractions (one per layer), not both.")
    if fractions is None:
        _check_mean(mean)
        fractions = [float(mean)] * adapter.num_layers
    target = sliced_parameter_count(model, fractions)
    gaps = [abs(shortgpt_parameter_count(model, n) - target) for n in range(adapter.num_layers)]
    return min(range(len(gaps)), key=lambda n: (gaps[n], n))


def equal_parameter_constant_fraction(model: nn.Module, fractions: torch.Tensor | list[float]) -> float:
    """The constant slice fraction whose SliceGPT model comes closest in parameter count to slicing with
    ``fractions`` (e.g. a dynamic vector): constant slicing "at equal parameter count", the like-for-like
    baseline when a dynamic vector and the constant one of the same mean differ in size (the shortcut matrices
    are quadratic in each layer's width).

    The kept width d = round((1 - p) D) is an integer, so the candidates are p = 1 - d / D for d = 1..D; the
    count grows with d, found by bisection; ties go to the larger model (the harder baseline)."""
    adapter = _check_family(model, "slicegpt")
    hidden = adapter.hidden_size
    target = sliced_parameter_count(model, fractions)
    n_layers = adapter.num_layers

    def count(d: int) -> int:
        return sliced_parameter_count(model, [1 - d / hidden] * n_layers)

    low, high = 1, hidden  # smallest d with count(d) >= target, or hidden when none reaches it
    while low < high:
        middle = (low + high) // 2
        if count(middle) >= target:
            high = middle
        else:
            low = middle + 1
    best = low if low == 1 or abs(count(low) - target) <= abs(count(low - 1) - target) else low - 1
    return 1 - best / hidden


# --------------------------------------------------------------------------------------------------
# Saving and loading a sliced model


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
    if not _is_sliced(model):
        return layout
    layers = []
    for i in range(adapter.num_layers):
        layer, norms = adapter.layer(i), adapter.norms(i)
        if not isinstance(layer, (SlicedLlamaLayer, SlicedOPTLayer)):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, not a sliced layer: a partly sliced model.")
        layers.append({
            "d_in": int(layer.attn_shortcut.in_features),
            "d_mid": int(layer.attn_shortcut.out_features),
            "d_out": int(layer.mlp_shortcut.out_features),
            "norm_eps": [_norm_eps(norms["attention"]), _norm_eps(norms["mlp"])],
        })
    layout["layers"] = layers
    layout["final_norm_eps"] = _norm_eps(adapter.final_norm)
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
        "parameters": _unique_parameters(model),
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
    family = "opt" if model.config.model_type == "opt" else "llama"
    layer_class = SlicedOPTLayer if family == "opt" else SlicedLlamaLayer
    like = adapter.embed_tokens.weight
    embeddings = [adapter.embed_tokens] + ([adapter.decoder.embed_positions] if family == "opt" else [])
    for embedding in embeddings:
        embedding.weight = nn.Parameter(like.new_empty(embedding.weight.shape[0], layout["embedding_dim"]),
                                        requires_grad=False)
        embedding.embedding_dim = layout["embedding_dim"]
    for i, shape in enumerate(layout["layers"]):
        d_in, d_mid, d_out = shape["d_in"], shape["d_mid"], shape["d_out"]
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        for name in ("q", "k", "v"):
            _replace_module(model, attention[name], _empty_linear(attention[name], d_in=d_in))
        _replace_module(model, attention["o"], _empty_linear(attention["o"], d_out=d_mid))
        for name, linear in mlp.items():
            _replace_module(model, linear, _empty_linear(linear, **({"d_out": d_out} if name == "down" else {"d_in": d_mid})))
        eps_attention, eps_mlp = shape["norm_eps"]
        _replace_module(model, norms["attention"], nn.RMSNorm(d_in, eps=eps_attention, dtype=like.dtype))
        _replace_module(model, norms["mlp"], nn.RMSNorm(d_mid, eps=eps_mlp, dtype=like.dtype))
        adapter.layers[i] = layer_class(adapter.layer(i), _shortcut(torch.zeros(d_in, d_mid), like),
                                        _shortcut(torch.zeros(d_mid, d_out), like))
    d_last = layout["layers"][-1]["d_out"]
    _replace_module(model, adapter.final_norm, nn.RMSNorm(d_last, eps=layout["final_norm_eps"], dtype=like.dtype))
    head = adapter.lm_head
    _replace_module(model, head, _empty_linear(head, d_in=d_last, bias=layout["head_bias"]))


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
        _record(model, info["settings"])
    if device is not None:
        model = model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Constant vs dynamic slicing vs ShortGPT, at several mean slice fractions


@torch.no_grad()
def compare_methods(
    model: nn.Module,
    calibration: torch.Tensor,
    means: list[float],
    amplitude: float,
    evaluate: Callable[[nn.Module], dict[str, Any]],
    lr_scores: torch.Tensor | None = None,
    bi_scores: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    match_parameters: bool = False,
    pass_row: bool = False,
) -> Any:
    """Slice copies of ``model`` three ways at each mean slice fraction M in ``means`` and evaluate each.

    ``constant``: SliceGPT with every fraction M. ``dynamic``: fractions from layer redundancy with mean M
    and ``amplitude`` (:func:`slice_fractions`). ``shortgpt``: ShortGPT removing
    :func:`equal_parameter_shortgpt_layers` layers (equal parameter count to the constant model). With
    ``match_parameters``, a fourth row per M: ``constant`` at the fraction of
    :func:`equal_parameter_constant_fraction` (equal parameter count to the dynamic model at M). A
    ``dense`` row (M = 0) comes first. ``evaluate(model) -> dict`` adds its entries (perplexity,
    accuracy, ...) to each row; with ``pass_row`` it is called ``evaluate(model, row)``, ``row`` holding the
    row's mean, method and matched (e.g. to run a costly metric at some levels only). ``model`` itself is left
    unchanged; LR / BI scores are computed once when not given. Returns a tidy DataFrame: mean, method,
    matched ("mean": sliced at mean fraction M; "parameters": matched in size, ShortGPT to constant and the extra
    constant row to dynamic; "" for dense), slice_fraction (the mean fraction actually sliced), layers,
    parameters, params_ratio, removed_layers, dims, then the evaluation's columns.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    check_complete(model, "compare slicing methods on this model")
    adapter = _check_family(model, "slicegpt")
    check_calibration(model, calibration)
    for mean in means:
        _check_mean(mean)
    n_layers = adapter.num_layers
    lr_scores = _check_scores(lr_scores, n_layers, "lr")
    bi_scores = _check_scores(bi_scores, n_layers, "bi")
    if lr_scores is None:
        lr_scores = layer_scores(model, calibration, "lr", batch_size)
    if bi_scores is None:
        bi_scores = layer_scores(model, calibration, "bi", batch_size)
    dynamic = {mean: slice_fractions(lr_scores, mean, amplitude) for mean in means}  # all checked up front

    def run(candidate: nn.Module, row: dict[str, Any]) -> dict[str, Any]:
        return evaluate(candidate, dict(row)) if pass_row else evaluate(candidate)

    dense_count = _unique_parameters(model)
    dense_row = {"mean": 0.0, "method": "dense", "matched": "", "slice_fraction": 0.0}
    rows = [{**dense_row, "layers": n_layers, "parameters": dense_count, "removed_layers": [],
             "dims": [adapter.hidden_size] * n_layers, **run(model, dense_row)}]
    plans = [(mean, method, matched) for mean in means
             for method, matched in [("constant", "mean"), ("dynamic", "mean"), ("shortgpt", "parameters")]
             + ([("constant", "parameters")] if match_parameters else [])]
    for mean, method, matched in tqdm(plans, desc="slice + evaluate", disable=not progress):
        copied = copy.deepcopy(model)
        if method == "constant":
            fraction = mean if matched == "mean" else equal_parameter_constant_fraction(model, dynamic[mean])
            slice_model(copied, calibration, mean=fraction, batch_size=batch_size)
        elif method == "dynamic":
            fraction = float(torch.as_tensor(dynamic[mean], dtype=torch.float64).mean())
            slice_model(copied, calibration, fractions=dynamic[mean], batch_size=batch_size)
        else:
            n_remove = equal_parameter_shortgpt_layers(model, mean=mean)
            fraction = math.nan
            slice_model(copied, calibration, mean=n_remove / n_layers, method="shortgpt", scores=bi_scores,
                        batch_size=batch_size)
        settings = records.SLICING.get(copied)
        row = {"mean": mean, "method": method, "matched": matched, "slice_fraction": fraction}
        rows.append({**row, "layers": get_adapter(copied).num_layers,
                     "parameters": _unique_parameters(copied), "removed_layers": settings.get("removed_layers", []),
                     "dims": settings.get("dims", [adapter.hidden_size] * get_adapter(copied).num_layers),
                     **run(copied, row)})
        del copied
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("parameters") + 1, "params_ratio", table.parameters / dense_count)
    return table
