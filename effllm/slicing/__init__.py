"""Dynamic slicing by layer redundancy (Dumitru et al. 2024) on top of SliceGPT (Ashkboos et al. 2024),
and ShortGPT layer removal (Men et al. 2024) as the baseline on the same layer scores.

    scores = layer_scores(model, calibration_ids, kind="lr")        # [L], 1 = most redundant layer
    fractions = slice_fractions(scores, mean=0.25, amplitude=0.1)   # [L], mean exactly 0.25
    model = slice_model(model, calibration_ids, fractions=fractions)
    model = slice_model(model, calibration_ids, mean=0.25)          # constant SliceGPT
    model = slice_model(model, calibration_ids, mean=0.25, method="shortgpt")  # drop 25% of the layers
    save_sliced(model, "out/smollm2-sliced-25"); model = load_sliced("out/smollm2-sliced-25")
    amplitude_grid(0.3)                                             # the authors' sweep of A: 0, 0.02, ..., 0.3

Constant vs dynamic slicing vs ShortGPT on one model is an experiment:
:func:`effllm.experiments.slicing_compare.compare_methods`.

Parameter counts without slicing anything (for comparisons at equal size):

    sliced_parameter_count(model, fractions)      # what SliceGPT with these fractions leaves
    shortgpt_parameter_count(model, n_remove)     # what removing n_remove layers leaves
    equal_parameter_shortgpt_layers(model, fractions=[0.25] * 30)   # ShortGPT layers to remove for the same size

As the authors' code computes them (issue 31): LR compares the last layer's input with final_norm(output)
(``layer_scores(..., last_layer="normed")``, the default for LR; ``"raw"`` is the paper's text), and SliceGPT
keeps the last layer's output and the LM head at the full width D (``slice_model(..., slice_head=False)``, the
authors' ``do_slice_head=False``; ``True`` slices them to d_{L-1}).

SliceGPT in five steps (PAPERS.md E), all rotations computed in float64 (:mod:`effllm.slicing.slicegpt`):

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
   signal; its output keeps the next layer's d_{l+1} directions, the last layer's all D (or d_{L-1} with
   ``slice_head``).
5. The shortcut matrices are small ``nn.Linear`` modules on the residual path, so each decoder layer
   is replaced by a :class:`SlicedLlamaLayer` / :class:`SlicedOPTLayer` that holds the original
   (now smaller) submodules under their original names and adds the shortcuts. The adapter, the
   HF ``model(ids)`` forward, ``generate`` and the KV cache keep working.

A norm over d < D dimensions divides by sqrt(sum x^2 / d) where the original divided by
sqrt(sum x^2 / D); the sliced norms are ``torch.nn.RMSNorm(d)`` with weight sqrt(D / d) and eps * d / D,
which is the original RMSNorm over D exactly (TransformerCompression writes its own norm for this).

Parameter cost to know about: a tied LM head must be untied (the embeddings live in layer 0's basis,
the head in the last layer's), which adds V * D parameters (V * d_{L-1} with ``slice_head``), and every layer
gains d_l^2 + d_l d_{l+1} of shortcuts. SmolLM2-135M (134.5 M parameters, V = 49152, D = 576) sliced 25%
everywhere has 140.7 M with the full head and 133.3 M with a sliced one (:func:`sliced_parameter_count`); it
first shrinks below its dense size at M = 0.3 (132.5 M; 123.7 M with a sliced head). Dynamic fractions with the
same mean M do not give the same parameter count (the shortcuts are quadratic in d, and the embeddings follow
layer 0's fraction).

Modules: ``scores`` (layer scores, slice fractions, amplitude grid), ``checks`` (input checks, kept widths),
``layers`` (the sliced decoder layers), ``surgery`` (weight surgery helpers), ``slicegpt`` (the rotation and
slicing), ``shortgpt`` (layer removal), ``entry`` (:func:`slice_model`), ``counts`` (parameter counts),
``storage`` (save and load).
"""

from effllm.slicing.checks import SHORTGPT_FAMILIES, SLICEGPT_FAMILIES, sliced_dims
from effllm.slicing.counts import (
    equal_parameter_constant_fraction,
    equal_parameter_shortgpt_layers,
    shortgpt_parameter_count,
    sliced_parameter_count,
    unique_parameters,
)
from effllm.slicing.entry import slice_model
from effllm.slicing.layers import SlicedLlamaLayer, SlicedOPTLayer
from effllm.slicing.scores import amplitude_grid, layer_scores, slice_fractions
from effllm.slicing.storage import (
    SLICED_FORMAT,
    SLICED_KIND,
    SLICED_WEIGHTS_FILE,
    SlicedModelError,
    load_sliced,
    save_sliced,
    sliced_layout,
)

__all__ = [
    "SHORTGPT_FAMILIES", "SLICEGPT_FAMILIES", "SLICED_FORMAT", "SLICED_KIND", "SLICED_WEIGHTS_FILE",
    "SlicedLlamaLayer", "SlicedModelError", "SlicedOPTLayer", "amplitude_grid", "equal_parameter_constant_fraction",
    "equal_parameter_shortgpt_layers", "layer_scores", "load_sliced", "save_sliced", "shortgpt_parameter_count",
    "slice_fractions", "slice_model", "sliced_dims", "sliced_layout", "sliced_parameter_count", "unique_parameters",
]
