"""The exit, at its public address: the seeds'-keyword ``generate`` and ``make_policy``
(:mod:`effllm.decoding.seeds`), and the exit head, exit logits and confidences (:mod:`effllm.decoding.exits`).

    out = effllm.exits.generate(model, input_ids, 64, method="calm", exit_conf_threshold=0.9, exit_min_layer=20)
    out.sequences      # [batch, prompt + new] as HF `generate` returns them
    out.exit_layers    # [batch, new]: the 1-based layer each new token's prediction read (L = full depth)
"""

from effllm.decoding.core import DecodeOutput
from effllm.decoding.early_exit import AdaptiveThreshold
from effllm.decoding.exits import (
    ExitHead,
    adaptive_k,
    agreement_counts,
    decaying_k,
    exit_logits,
    head_flops,
    softmax_confidence,
    state_confidence,
)
from effllm.decoding.policies import CONFIDENCE_TYPES, decayed_threshold
from effllm.decoding.seeds import (
    DEFAULTS,
    METHODS,
    OPTIONS,
    SEED_NAMES,
    VOCAB_REDUCTIONS,
    generate,
    in_seed_names,
    make_policy,
)

ExitOutput = DecodeOutput  # the name this module has always returned

__all__ = ["CONFIDENCE_TYPES", "DEFAULTS", "METHODS", "OPTIONS", "SEED_NAMES", "VOCAB_REDUCTIONS", "AdaptiveThreshold", "ExitHead",
           "ExitOutput", "adaptive_k", "agreement_counts", "decayed_threshold", "decaying_k", "exit_logits", "generate",
           "head_flops", "in_seed_names", "make_policy", "softmax_confidence", "state_confidence"]
