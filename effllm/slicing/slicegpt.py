"""SliceGPT's surgery (Ashkboos et al. 2024): fold the norms, then rotate and slice layer by layer.

Follows TransformerCompression's ``rotate_and_slice_sequential`` (and DynamicSlicing's copy of it,
``src/slicegpt/rotate.py:176-290``): each PCA is taken on the signal of the model whose lower layers are already
sliced. The last layer's output and the LM head stay at the full width D unless ``slice_head`` (the authors'
``do_slice_head``, False by default and as DynamicSlicing runs it: ``src/slicegpt/rotate.py:161, 271-274,
286-288``, ``experiments/run_slicegpt_perplexity.py:275-277``; TransformerCompression
``src/slicegpt/slicing_scheduler.py:19-21, 101-117``).
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.adapters import ArchitectureAdapter, get_adapter
from effllm.capture import LayerByLayer, capture_inputs
from effllm.slicing import surgery
from effllm.slicing.checks import output_dims
from effllm.slicing.layers import sliced_layer_class


def fuse_norms(model: nn.Module, adapter: ArchitectureAdapter) -> None:
    """Step 1: untie the head, (OPT) centre the residual stream, fold every norm into its readers."""
    head, embed = adapter.lm_head, adapter.embed_tokens
    opt = model.config.model_type == "opt"
    if opt and adapter.final_norm.bias is not None and head.bias is None:
        # the final LayerNorm's bias becomes an LM-head bias: give the head one
        new_head = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype,
                             device=head.weight.device)
        surgery.set_weight(new_head, head.weight.detach().double().clone(),
                           torch.zeros(head.out_features, dtype=torch.float64))
        surgery.replace_module(model, head, new_head)
        head = new_head
    else:  # a fresh Parameter unties a head shared with the embeddings
        surgery.set_weight(head, head.weight.detach().double().clone())
    model.config.tie_word_embeddings = False

    if opt:
        for embedding in (embed, adapter.decoder.embed_positions):  # OPT's learned positions live on its decoder
            weight = embedding.weight.detach().double()
            surgery.set_weight(embedding, weight - weight.mean(dim=1, keepdim=True))
        for i in range(adapter.num_layers):
            surgery.centre_output(adapter.attention_projections(i)["o"])
            surgery.centre_output(adapter.mlp_projections(i)["down"])

    for i in range(adapter.num_layers):
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        surgery.fold_norm(norms["attention"], [attention[k] for k in ("q", "k", "v")])
        surgery.fold_norm(norms["mlp"], [m for k, m in mlp.items() if k != "down"])
    surgery.fold_norm(adapter.final_norm, [head])


def embeddings(model: nn.Module, adapter: ArchitectureAdapter) -> list[nn.Embedding]:
    """The tables that write the residual stream's first state (OPT's learned positions too)."""
    return [adapter.embed_tokens] + ([adapter.decoder.embed_positions] if model.config.model_type == "opt" else [])


@torch.no_grad()
def rotate_and_slice(model: nn.Module, calibration: torch.Tensor, dims: list[int], batch_size: int,
                     where: dict[str, str], slice_head: bool = False) -> nn.Module:
    """SliceGPT in place, keeping ``dims[l]`` directions of layer l's input and middle signal; layer l's output
    keeps the next layer's, the last layer's all D unless ``slice_head``. ``where["step"]`` says how far it got
    (for the mark left by an interruption)."""
    adapter = get_adapter(model)
    full = adapter.hidden_size
    like = adapter.embed_tokens.weight
    layer_class = sliced_layer_class(model)
    d_outs = output_dims(dims, full, slice_head)
    fuse_norms(model, adapter)

    where["step"] = "after folding the norms, before layer 0"
    runner = LayerByLayer(model, calibration, batch_size=batch_size)  # embeddings, original basis
    basis = surgery.pca(surgery.covariance(runner.states))[:, : dims[0]]  # [D, d_0]
    for embedding in embeddings(model, adapter):
        surgery.set_weight(embedding, embedding.weight.detach().double() @ basis)
    runner.states = [(s.double() @ basis).to(s.dtype) for s in runner.states]

    for i in range(adapter.num_layers):
        where["step"] = f"at layer {i} of {adapter.num_layers} (0-based; layers before it are sliced)"
        d_in, d_mid, d_out = dims[i], dims[i], d_outs[i]
        layer, norms = adapter.layer(i), adapter.norms(i)
        attention, mlp = adapter.attention_projections(i), adapter.mlp_projections(i)

        # (a) attention input in the sliced basis; the rest of the layer still in the original basis,
        # reached through shortcuts basis^T and the identity, so the middle signal can be measured
        surgery.replace_module(model, norms["attention"],
                               surgery.rms_norm(d_in, full, surgery.norm_eps(norms["attention"]), like))
        surgery.replace_module(model, norms["mlp"], surgery.rms_norm(full, full, surgery.norm_eps(norms["mlp"]), like))
        for name in ("q", "k", "v"):
            surgery.rotate_input(attention[name], basis)
        identity = torch.eye(full, dtype=torch.float64)
        sliced = layer_class(layer, surgery.shortcut(basis.T, like), surgery.shortcut(identity, like))
        adapter.layers[i] = sliced
        norms = adapter.norms(i)

        # (b) PCA between attention and MLP; rotate the attention output and the MLP input
        middle: list[torch.Tensor] = []
        with capture_inputs({"mlp": norms["mlp"]}, lambda _name, x, store=middle: store.append(x)):
            runner.run(i)
        mid_basis = surgery.pca(surgery.covariance(middle))[:, :d_mid]
        surgery.rotate_output(attention["o"], mid_basis)
        sliced.attn_shortcut = surgery.shortcut(basis.T @ mid_basis, like)
        surgery.replace_module(model, norms["mlp"], surgery.rms_norm(d_mid, full, surgery.norm_eps(norms["mlp"]), like))
        for name, linear in mlp.items():
            if name != "down":
                surgery.rotate_input(linear, mid_basis)
        sliced.mlp_shortcut = surgery.shortcut(mid_basis.T, like)  # back to the original basis until (c)

        # (c) PCA of the layer output (original basis): the next layer's input basis (the head's, after the last)
        outputs = runner.run(i)
        out_basis = surgery.pca(surgery.covariance(outputs))[:, :d_out]
        surgery.rotate_output(mlp["down"], out_basis)
        sliced.mlp_shortcut = surgery.shortcut(mid_basis.T @ out_basis, like)
        runner.advance(i, [(o.double() @ out_basis).to(o.dtype) for o in outputs])
        basis = out_basis

    where["step"] = "at the final norm and LM head (every layer is sliced)"
    final = adapter.final_norm
    surgery.replace_module(model, final, surgery.rms_norm(basis.shape[1], full, surgery.norm_eps(final), like))
    surgery.rotate_input(adapter.lm_head, basis)  # [V, D] @ [D, d_head]: rotated, and sliced with slice_head
    return model
