"""The seeds'-keyword front end over :mod:`effllm.decoding` (public as ``effllm.exits.generate`` and
``effllm.exits.make_policy``). It lives beside the engine it maps onto, so that ``effllm.exits`` can stay the
short public address of the exit (this front end and :mod:`effllm.decoding.exits`).

    out = generate(model, input_ids, max_new_tokens=64, method="calm",
                   exit_conf_type="softmax", exit_conf_threshold=0.9, exit_min_layer=20)
    out.sequences      # [batch, prompt + new] as HF `generate` returns them
    out.exit_layers    # [batch, new]: the 1-based layer each new token left from (L = full depth)

Parameter names follow the CALM / FREE code (seed 001), the vocabulary-pruning code (seed 000), the layer
selection code (seed 003) and LayerSkip (self-speculation). ``generate`` turns them into one policy object
(:mod:`effllm.decoding.policies`) and calls :func:`effllm.decoding.decode`; code that builds many settings can
use the policies directly. This is the one place where the seeds' names meet the policies' (one name per
concept: ``threshold``, ``candidate_layer``, ``kv``; see :func:`make_policy`), and its error messages use the
seeds' names. An option the chosen method does not use is an error (it would be ignored), unless it is left at
its default.

The prompt is always run at full depth (the "encoder side" of a decoder-only model), except for static exits
and ``skip_prompt``, so the first new token leaves from layer L. With a threshold above 1, which no confidence
reaches, CALM and FREE never exit and reproduce HF ``generate``. On T5 (the papers' own setting) ``input_ids`` is
the encoder input and ``sequences`` starts with the decoder start token, as HF returns it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from effllm import checks
from effllm.adapters import get_adapter
from effllm.decoding import policies
from effllm.decoding.core import DecodeOutput, decode

METHODS = ("full", "static", "calm", "free", "skip", "self-spec")
VOCAB_REDUCTIONS = ("none", *policies.VOCAB_REDUCTIONS)

__all__ = ["DEFAULTS", "METHODS", "OPTIONS", "VOCAB_REDUCTIONS", "generate", "make_policy"]

# Every option generate() takes besides the model, the prompt and the length, with its default.
DEFAULTS: dict[str, Any] = {
    "static_exit_layer": None, "exit_conf_type": "softmax", "exit_conf_threshold": 0.9, "exit_min_layer": 1,
    "exit_position_temp": None, "state_propagation": True, "shallow_exit_layer": None,
    "shallow2deep_conf_type": "softmax", "shallow2deep_conf_threshold": 0.9, "meta_classifier": None,
    "use_adapt_threshold": False, "adapt_threshold": None, "rollback_threshold": None, "type_vocab_reduct": "none",
    "k": 256, "k_min": None, "skip_mode": "static", "skip_pattern": None, "budget": None, "controller": None,
    "skipped_kv": "propagate", "seed": 0, "skip_prompt": False, "draft_exit_layer": None, "num_draft_tokens": 4,
}
_VOCAB = ("type_vocab_reduct", "k", "k_min")
OPTIONS: dict[str, tuple[str, ...]] = {  # method -> the options it uses
    "full": (),
    "static": ("static_exit_layer",),
    "calm": ("exit_conf_type", "exit_conf_threshold", "exit_min_layer", "exit_position_temp", "state_propagation",
             "meta_classifier", *_VOCAB),
    "free": ("shallow_exit_layer", "shallow2deep_conf_type", "shallow2deep_conf_threshold", "use_adapt_threshold",
             "adapt_threshold", "rollback_threshold", "exit_min_layer", *_VOCAB),
    "skip": ("skip_mode", "skip_pattern", "budget", "controller", "skipped_kv", "seed", "skip_prompt"),
    "self-spec": ("draft_exit_layer", "num_draft_tokens", *_VOCAB),
}


def _is_default(name: str, value: Any) -> bool:
    default = DEFAULTS[name]
    try:
        return value is default or bool(value == default)
    except (TypeError, RuntimeError, ValueError):  # tensors and other values without a plain truth value
        return False


# The policies' one name per concept, and the seeds' names for it per method (error messages speak the seeds').
SEED_NAMES = {
    "calm": {"threshold": "exit_conf_threshold", "candidate_layer": "exit_min_layer", "kv": "state_propagation"},
    "free": {"threshold": "shallow2deep_conf_threshold", "candidate_layer": "exit_min_layer"},
    "skip": {"kv": "skipped_kv"},
}


def _calm_kv(state_propagation: Any) -> str:
    if not isinstance(state_propagation, bool):
        raise ValueError(f"state_propagation must be True or False; got {state_propagation!r}")
    return "propagate" if state_propagation else "deferred"


def in_seed_names(message: str, method: str) -> str:
    """``message`` with the policies' names of ``method``'s settings replaced by the seeds' names."""
    for new, old in SEED_NAMES.get(method, {}).items():
        message = re.sub(rf"\b{new}\b", old, message)
    return message


def make_policy(method: str = "full", **options: Any) -> policies.Policy:
    """The policy for ``method`` and the seeds' keyword ``options`` (see :func:`generate`): the seeds'
    ``exit_conf_threshold`` / ``shallow2deep_conf_threshold`` become ``threshold``, ``exit_min_layer`` becomes
    ``candidate_layer``, ``state_propagation`` (True / False) becomes ``kv="propagate"`` / ``"deferred"`` and
    ``skipped_kv`` becomes ``kv``."""
    checks.choice("method", method, METHODS)
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    ignored = [name for name, value in options.items() if name not in OPTIONS[method] and not _is_default(name, value)]
    if ignored:
        owners = sorted({m for m, names in OPTIONS.items() for name in ignored if name in names})
        raise ValueError(f"option(s) {', '.join(ignored)} belong to method={' / '.join(map(repr, owners)) or '?'}, "
                         f"not method={method!r}, which would ignore them; leave them out")
    o = {**DEFAULTS, **options}
    vocab = None
    if method in ("calm", "free", "self-spec"):
        checks.choice("type_vocab_reduct", o["type_vocab_reduct"], VOCAB_REDUCTIONS)
        if o["type_vocab_reduct"] != "none":
            vocab = policies.VocabPruning(o["type_vocab_reduct"], o["k"], o["k_min"])
    if method == "full":
        return policies.Full()
    if method == "static":
        if o["static_exit_layer"] is None:
            raise ValueError("method='static' needs static_exit_layer (a 1-based layer)")
        return policies.StaticExit(o["static_exit_layer"])
    if method == "calm":
        return policies.Calm(o["exit_conf_type"], threshold=policies.check_threshold(
                                 "exit_conf_threshold", o["exit_conf_threshold"]),
                             candidate_layer=o["exit_min_layer"], exit_position_temp=o["exit_position_temp"],
                             kv=_calm_kv(o["state_propagation"]), vocab=vocab, meta_classifier=o["meta_classifier"])
    if method == "free":
        if o["shallow_exit_layer"] is None:
            raise ValueError("method='free' needs shallow_exit_layer (a 1-based layer below the last)")
        if vocab is None and not _is_default("exit_min_layer", o["exit_min_layer"]):
            raise ValueError("exit_min_layer belongs to method='calm'; with method='free' it sets the layer that "
                             "picks the pruned vocabulary and needs type_vocab_reduct")
        threshold = policies.check_threshold("shallow2deep_conf_threshold", o["shallow2deep_conf_threshold"])
        return policies.Free(o["shallow_exit_layer"], threshold, o["shallow2deep_conf_type"],
                             o["use_adapt_threshold"], o["adapt_threshold"], o["rollback_threshold"], vocab,
                             candidate_layer=o["exit_min_layer"] if vocab is not None else None)
    if method == "skip":
        checks.choice("skipped_kv", o["skipped_kv"], policies.SKIP_KV)
        return policies.Skip(o["skip_mode"], o["skip_pattern"], o["budget"], o["controller"], kv=o["skipped_kv"],
                             seed=o["seed"], skip_prompt=o["skip_prompt"])
    if o["draft_exit_layer"] is None:
        raise ValueError("method='self-spec' needs draft_exit_layer (a 1-based layer below the last)")
    return policies.SelfSpec(o["draft_exit_layer"], o["num_draft_tokens"], vocab)


@torch.no_grad()
def generate(  # noqa: PLR0913 -- one keyword per option of the seeds' command lines (the API contract)
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    method: str = "full",
    eos_token_id: int | list[int] | None = None,
    static_exit_layer: int | None = None,
    exit_conf_type: str = "softmax",
    exit_conf_threshold: float = 0.9,
    exit_min_layer: int = 1,
    exit_position_temp: float | None = None,
    state_propagation: bool = True,
    shallow_exit_layer: int | None = None,
    shallow2deep_conf_type: str = "softmax",
    shallow2deep_conf_threshold: float = 0.9,
    exit_transform: Callable[[int, torch.Tensor], torch.Tensor] | str | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    **options: Any,
) -> DecodeOutput:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``input_ids`` [batch, prompt].

    ``method``:

    - ``full``: every layer (a batch of prompts is allowed, left-padded with ``attention_mask``).
    - ``static``: every token (the prompt too) uses layers 1..``static_exit_layer``.
    - ``calm`` (batch 1): after each layer >= ``exit_min_layer`` compute the ``exit_conf_type`` confidence
      (``softmax`` p1 - p2, ``state`` cos(h_{l-1}, h_l), ``meta`` a fitted classifier passed as
      ``meta_classifier(layer, h) -> probability``) and exit once it reaches ``exit_conf_threshold``
      (``exit_position_temp`` set: CALM's decaying threshold lambda (0.9 + 0.1 exp(-temp t / N))).
    - ``free`` (batch 1): shallow exit at ``shallow_exit_layer`` when the ``shallow2deep_conf_type`` confidence
      exceeds ``shallow2deep_conf_threshold``; deep layers synchronized in parallel on the next deep token.
      ``use_adapt_threshold``: FREE's Beta-mixture estimator starting from that threshold (pass
      ``adapt_threshold=AdaptiveThreshold(...)`` to keep learning across calls). ``rollback_threshold`` (nats):
      after a synchronized pass, revise from the first shallow token whose deep cross-entropy exceeds it.
    - ``skip`` (batch 1): layer skipping with ``skip_mode``, ``skip_pattern``, ``budget``, ``controller``,
      ``skipped_kv``, ``seed``, ``skip_prompt`` (see :class:`effllm.decoding.policies.Skip`).
    - ``self-spec`` (batch 1): self-speculative decoding, drafting ``num_draft_tokens`` tokens at
      ``draft_exit_layer`` and verifying them at full depth (exactly greedy full-depth output).

    ``type_vocab_reduct`` (``none`` | ``fixed`` | ``decaying`` | ``adaptive``) with ``k`` (and ``k_min``) prunes the
    vocabulary of the softmax confidence from ``exit_min_layer`` on (CALM; FREE picks its candidates at
    ``exit_min_layer`` below the shallow exit; self-spec prunes the drafts). ``exit_transform(layer, h)`` maps an
    intermediate state before the final norm and LM head (a fitted exit); None uses the model's attached exits
    if any, else the logit lens. Generation stops at ``eos_token_id`` (default: the model's; ``[]``: never).
    """
    given = {
        "static_exit_layer": static_exit_layer, "exit_conf_type": exit_conf_type,
        "exit_conf_threshold": exit_conf_threshold, "exit_min_layer": exit_min_layer,
        "exit_position_temp": exit_position_temp, "state_propagation": state_propagation,
        "shallow_exit_layer": shallow_exit_layer, "shallow2deep_conf_type": shallow2deep_conf_type,
        "shallow2deep_conf_threshold": shallow2deep_conf_threshold, **options,
    }
    policy = make_policy(method, **given)
    if method == "skip" and exit_transform is not None:
        raise ValueError("exit_transform belongs to the early-exit methods; method='skip' reads the final head")
    adapter = get_adapter(model)
    try:  # the checks against the model, in the seeds' names (decode runs them again, in the policies')
        policy.check(adapter.num_layers, adapter.vocab_size)
    except ValueError as error:
        raise ValueError(in_seed_names(str(error), method)) from None
    return decode(model, input_ids, max_new_tokens, policy, eos_token_id=eos_token_id, attention_mask=attention_mask,
                  exit_transform=exit_transform)
