"""Decoding: one core, one policy object per method.

    from effllm.decoding import decode, Full, StaticExit, Calm, Free, Skip, SelfSpec, VocabPruning

    out = decode(model, input_ids, 64, Free(shallow_exit_layer=20, threshold=0.9))

Modules: ``policies`` (the dataclasses, validated when built), ``core`` (``decode`` and ``DecodeOutput``: the
prompt pass, cache, end of sequence, padded batches, bookkeeping), ``exits`` (the exit: exit map lookup,
``exit_logits``, per-layer agreement, confidences, ``ExitHead``), ``early_exit`` (CALM and FREE),
``skipping`` (skip plans and the skip step), ``plans`` (skip patterns), ``speculative`` (self-speculative
decoding), ``state`` (the strategy interface), ``seeds`` (the seeds'-keyword front end over ``decode``, public as
``effllm.exits.generate``).
"""

from effllm.decoding.core import LOGIT_LENS, DecodeOutput, decode
from effllm.decoding.early_exit import AdaptiveThreshold
from effllm.decoding.policies import Calm, Free, Full, Policy, SelfSpec, Skip, StaticExit, VocabPruning

__all__ = ["LOGIT_LENS", "AdaptiveThreshold", "Calm", "DecodeOutput", "Free", "Full", "Policy", "SelfSpec", "Skip",
           "StaticExit", "VocabPruning", "decode"]
