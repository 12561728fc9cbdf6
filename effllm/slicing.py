"""Dynamic slicing by layer redundancy (Dumitru et al. 2024) on top of SliceGPT (Ashkboos et al. 2024),
and ShortGPT layer removal (Men et al. 2024) as the baseline on the same layer scores.

    scores = layer_scores(model, calibration_ids, kind="lr")        # [L], 1 = most redundant layer
    fractions = slice_fractions(scores, mean=0.25, amplitude=0.1)   # [L], mean exactly 0.25
    model = slice_model(model, calibration_ids, fractions=fractions)
    model = slice_model(model, calibration_ids, mean=0.25)          # constant SliceGPT
    model = slice_model(model, calibration_ids, mean=0.25, method="shortgpt")  # drop 25% of the layers

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

from typing import Literal

import torch
from torch import nn

from effllm.adapters import ArchitectureAdapter, UnsupportedArchitectureError, get_adapter
from effllm.capture import LayerByLayer, capture_inputs

SLICEGPT_FAMILIES = ("llama", "mistral", "qwen2", "opt")
SHORTGPT_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text", "opt")


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
    if model_type == "opt" and method == "slicegpt":
        decoder = adapter.decoder
        if not model.config.do_layer_norm_before or decoder.project_in is not None or decoder.project_out is not None:
            raise UnsupportedArchitectureError(
                "SliceGPT needs a pre-norm OPT without project_in/project_out (opt-350m is post-norm and "
                "projects its embeddings); use another OPT size."
            )
    return adapter


def _check_calibration(calibration: torch.Tensor) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be token ids [n_samples, seq_len]; got {shape}.")


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
def _slicegpt(model: nn.Module, calibration: torch.Tensor, dims: list[int], batch_size: int) -> nn.Module:
    adapter = get_adapter(model)
    family = "opt" if model.config.model_type == "opt" else "llama"
    full = adapter.hidden_size
    like = adapter.embed_tokens.weight
    layer_class = SlicedOPTLayer if family == "opt" else SlicedLlamaLayer
    _fuse_norms(model, adapter, family)

    runner = LayerByLayer(model, calibration, batch_size=batch_size)  # embeddings, original basis
    basis = _pca(_covariance(runner.states))[:, : dims[0]]  # [D, d_0]
    embeddings = [adapter.embed_tokens] + ([adapter.decoder.embed_positions] if family == "opt" else [])
    for embedding in embeddings:
        _set_weight(embedding, embedding.weight.detach().double() @ basis)
    runner.states = [(s.double() @ basis).to(s.dtype) for s in runner.states]

    for i in range(adapter.num_layers):
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

    final = adapter.final_norm
    _replace_module(model, final, _rms_norm(basis.shape[1], full, _norm_eps(final), like))
    _rotate_input(adapter.lm_head, basis)
    return model


# --------------------------------------------------------------------------------------------------
# ShortGPT


def _remove_layers(model: nn.Module, adapter: ArchitectureAdapter, remove: list[int]) -> None:
    layers = adapter.layers
    keep = [i for i in range(len(layers)) if i not in set(remove)]
    for i in sorted(remove, reverse=True):
        del layers[i]
    for new_index in range(len(layers)):  # KV-cache slots are indexed by layer_idx
        attention = adapter.attention(new_index)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.__dict__.pop("_effllm_adapter", None)  # the cached adapter holds per-layer facts


# --------------------------------------------------------------------------------------------------
# Entry point


def slice_model(
    model: nn.Module,
    calibration: torch.Tensor,
    mean: float | None = None,
    fractions: torch.Tensor | list[float] | None = None,
    method: Literal["slicegpt", "shortgpt"] = "slicegpt",
    amplitude: float | None = None,
    batch_size: int = 8,
) -> nn.Module:
    """Slice ``model`` in place with SliceGPT, or remove layers with ShortGPT, and return it.

    SliceGPT: ``fractions`` gives one slice fraction per layer (0 = keep every dimension); ``mean``
    alone slices every layer by ``mean``; ``mean`` with ``amplitude`` slices dynamically by layer
    redundancy (:func:`slice_fractions` of :func:`layer_scores` ``kind="lr"``). ShortGPT: removes the
    round(mean * L) layers of lowest Block Influence. ``calibration``: token ids [n_samples, seq_len].
    Every input is checked before the model is touched.
    """
    if method not in ("slicegpt", "shortgpt"):
        raise ValueError(f"method must be 'slicegpt' or 'shortgpt'; got {method!r}.")
    adapter = _check_family(model, method)
    _check_calibration(calibration)
    n_layers = adapter.num_layers

    if method == "shortgpt":
        if mean is None or fractions is not None or amplitude is not None:
            raise ValueError("shortgpt takes mean = the fraction of layers to remove (no fractions, no amplitude).")
        _check_mean(mean)
        n_remove = round(mean * n_layers)
        if n_remove >= n_layers:
            raise ValueError(f"mean={mean} removes all {n_layers} layers; use a smaller mean.")
        influence = layer_scores(model, calibration, kind="bi", batch_size=batch_size)
        remove = sorted(torch.argsort(influence)[:n_remove].tolist())
        _remove_layers(model, adapter, remove)
        return model

    if (mean is None) == (fractions is None):
        raise ValueError("give either mean (constant, or dynamic with amplitude) or fractions (one per layer), not both.")
    if fractions is None:
        _check_mean(mean)
        if amplitude is None:
            fractions = [float(mean)] * n_layers
        else:
            fractions = slice_fractions(layer_scores(model, calibration, "lr", batch_size), mean, amplitude)
    elif amplitude is not None:
        raise ValueError("amplitude goes with mean (dynamic slicing); with explicit fractions leave it out.")
    if len(fractions) != n_layers:
        raise ValueError(f"fractions has {len(fractions)} entries; the model has {n_layers} layers (one each).")
    dims = sliced_dims(fractions, adapter.hidden_size)
    return _slicegpt(model, calibration, dims, batch_size)
