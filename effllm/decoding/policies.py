"""Decoding policies: one frozen dataclass per decoding method, validated when it is built.

A policy says *which layers a generated token runs and when it may stop*; :func:`effllm.decoding.decode`
does the rest (prompt pass, KV cache, end of sequence) the same way for every policy:

    decode(model, ids, 64, Calm(threshold=0.9, candidate_layer=20))
    decode(model, ids, 64, Free(shallow_exit_layer=20, threshold=0.9))
    decode(model, ids, 64, Skip(skip_mode="static", budget=8 / 24))
    decode(model, ids, 64, SelfSpec(draft_exit_layer=10, num_draft_tokens=4))

Field names follow the seeds' command-line flags (CALM / FREE in seed 001, vocabulary pruning in seed 000,
layer skipping in seed 003, LayerSkip for self-speculation), except for three concepts that the seeds name
differently per method and that have one name here:

- ``threshold``: the exit threshold (the seeds' ``exit_conf_threshold`` in CALM, ``shallow2deep_conf_threshold``
  in FREE);
- ``candidate_layer``: CALM's first checked layer, where a pruned vocabulary picks its candidates (``exit_min_layer``),
  and FREE's layer that picks the pruned candidates (``prune_layer``);
- ``kv``: what the K/V of the layers a token skipped is made of (CALM's ``state_propagation`` bool, skipping's
  ``skipped_kv``), and on every policy the read-only ``kv_mode`` in :data:`KV_MODES`: what the decoder really does.

The seeds' names are mapped to these in :func:`effllm.exits.generate` (the seeds' front end); the policies also
take them as deprecated constructor keywords (``Calm(exit_conf_threshold=0.9, exit_min_layer=20)``,
``Free(shallow_exit_layer=20, shallow2deep_conf_threshold=0.9)``, ``prune_layer=``, ``state_propagation=``,
``skipped_kv=``) with a ``DeprecationWarning``; giving a seed name and its new name together is an error.
Checks that need no model run in
``__post_init__`` (a wrong type, an unknown choice, a negative threshold, an option that contradicts
another); checks against the model's depth and vocabulary run in :meth:`Policy.check` when decoding starts.
Every policy turns into table columns with :meth:`Policy.columns` (``method`` is the family, every
parameter its own column) and has a display ``label``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from effllm import checks
from effllm.decoding import vocab_schedule
from effllm.decoding.adaptive_threshold import AdaptiveThreshold
from effllm.decoding.plans import check_budget, plan_layers

CONFIDENCE_TYPES = ("softmax", "state", "meta")
VOCAB_REDUCTIONS = ("fixed", "decaying", "adaptive")
SKIP_MODES = ("static", "random", "controller", "early-exit")
# What the K/V of a layer a token skipped is made of (``Policy.kv_mode``):
# - "propagate": the skipped layer's K and V projections of the copied exit state, computed when the token leaves
#   (the adapter's ``append_kv``: about the K/V projections' share of the layer's work per skipped layer);
# - "deferred": the skipped layer runs in full on the token's saved state later, in one causal pass with a later
#   token that runs it (FREE's synchronized pass, CALM's kv="deferred", self-speculation's verification): exact
#   K/V at the whole layer's cost;
# - "none": nothing; no later token reads the skipped layer at that position (static exit, static and
#   early-exit skipping) or the position is left out of that layer's cache (Skip(kv="none")). Full skips nothing.
KV_MODES = ("propagate", "deferred", "none")
CALM_KV = ("propagate", "deferred")
SKIP_KV = ("propagate", "none")
SKIPPED_KV = SKIP_KV  # the name tests and notebooks have used for Skip's choices


def check_threshold(name: str, value: Any) -> float:
    """An exit threshold: a number >= 0. Above 1 is allowed on purpose: no confidence reaches it, which
    disables exiting."""
    return checks.number(name, value, low=0, hint=" (a value above 1 disables exiting)")


def _kv_from_state_propagation(value: Any) -> str:
    if not isinstance(value, bool):
        raise ValueError(f"state_propagation must be True or False; got {value!r} (new name: kv='propagate' / "
                         f"'deferred')")
    return "propagate" if value else "deferred"


def _deprecated_aliases(**aliases: tuple[str, Callable[[Any], Any]]):
    """Let a policy take the seeds' old keyword ``old`` for field ``new`` (``old=(new, convert)``) with a
    ``DeprecationWarning``, refusing both at once; reading ``policy.old`` warns and gives the new field's value
    (a bool for ``state_propagation``)."""

    def wrap(cls):
        init = cls.__init__
        order = [f.name for f in dataclasses.fields(cls) if f.init]  # positional order

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            replacing = not args and set(order) <= set(kwargs)  # dataclasses.replace(policy, old=...): old wins
            for old, (new, convert) in aliases.items():
                if old not in kwargs:
                    continue
                if not replacing and (new in kwargs or order.index(new) < len(args)):
                    raise TypeError(f"{cls.__name__}() got both {new}= and {old}= (the seeds' name of the same "
                                    f"setting, deprecated); give only {new}=")
                warnings.warn(f"{cls.__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = convert(kwargs.pop(old))
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for old, (new, _) in aliases.items():
            setattr(cls, old, property(functools.partial(_read_alias, old=old, new=new),
                                       doc=f"Deprecated: the seeds' name of ``{new}``."))
        return cls

    return wrap


def _read_alias(policy: Any, old: str, new: str) -> Any:
    warnings.warn(f"{type(policy).__name__}.{old} is deprecated; read .{new}", DeprecationWarning, stacklevel=3)
    value = getattr(policy, new)
    return value == "propagate" if old == "state_propagation" else value


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class VocabPruning:
    """Dynamic vocabulary pruning of the softmax exit confidence (Vincenti et al. 2024, seed 000), as the authors'
    code computes it (MatteoNulli/Vocabulary_pruning @7289604; the rules and lines in
    :mod:`effllm.decoding.vocab_schedule`).

    At the first checked layer the full head picks the top-``k`` candidate ids; each later check scores the rows
    picked at the check before and picks the next ones from them: ``fixed`` k; ``decaying``
    k_i = max(k_min, int(k_max / (1 + (k_max - k_min) / k_min * i / L))) (k_max 35000, k_min 250, the authors');
    ``adaptive`` k_i = int(k_{i-1} (1 - 0.9 c_{i-1})) from the previous check's confidence, floored at ``k_min``
    (2: the softmax gap needs two rows). ``k=None`` (``decaying`` / ``adaptive`` only) starts from the decaying size
    at the first check, as the authors' scripts run it (their ``--k`` unset).
    """

    type_vocab_reduct: str = "fixed"
    k: int | None = 256
    k_min: int | None = None
    k_max: int = vocab_schedule.K_MAX

    def __post_init__(self) -> None:
        checks.choice("type_vocab_reduct", self.type_vocab_reduct, VOCAB_REDUCTIONS)
        if self.k is None and self.type_vocab_reduct == "fixed":
            raise ValueError("type_vocab_reduct='fixed' needs k (the number of candidate ids kept); k=None is for "
                             "'decaying' and 'adaptive' (start from the decaying size)")
        if self.k is not None:
            checks.integer("k", self.k, hint=" (candidate ids kept at the pruning layer)")
        if self.k_min is None:
            floor = {"fixed": self.k, "decaying": vocab_schedule.K_MIN, "adaptive": vocab_schedule.MIN_ROWS}
            object.__setattr__(self, "k_min", floor[self.type_vocab_reduct])
        if self.type_vocab_reduct != "fixed":  # fixed k scores k rows at every check: k_min is k
            checks.integer("k_min", self.k_min, low=2, hint=" (the fewest rows a later check scores)")
        checks.integer("k_max", self.k_max, low=2, hint=" (the decaying schedule's start)")

    def check(self, vocab_size: int) -> None:
        if self.k is not None:
            checks.integer("k", self.k, low=2, high=vocab_size, hint=" (the vocabulary size is the most)")

    def first_size(self, layer: int, n_layers: int) -> int:
        floor = self.k_min if self.type_vocab_reduct == "decaying" else vocab_schedule.K_MIN  # the decaying start
        return vocab_schedule.first_size(self.type_vocab_reduct, self.k, layer, n_layers, self.k_max, floor)

    def next_size(self, layer: int, n_layers: int, previous: int, previous_confidence: float) -> int:
        if self.type_vocab_reduct == "fixed":
            return self.k
        if self.type_vocab_reduct == "decaying":
            return vocab_schedule.decaying_size(layer, n_layers, self.k_max, self.k_min)
        return max(self.k_min, vocab_schedule.adaptive_size(previous, previous_confidence))

    def columns(self) -> dict[str, Any]:
        return {"type_vocab_reduct": self.type_vocab_reduct, "k": self.k, "k_min": self.k_min}


def _vocab(value: VocabPruning | None) -> VocabPruning | None:
    if value is not None and not isinstance(value, VocabPruning):
        raise ValueError(f"vocab must be a VocabPruning(...) or None; got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Policy:
    """Base of every policy. Subclasses set ``method`` (the family name used in result tables)."""

    method: ClassVar[str] = ""
    batched: ClassVar[bool] = False  # True: a batch of prompts decodes at once (every row runs the same layers)

    def check(self, n_layers: int, vocab_size: int) -> None:
        """Checks against the model (depth, vocabulary); raises ``ValueError``."""

    @property
    def kv_mode(self) -> str:
        """What the K/V of the layers a token skipped is made of, one of :data:`KV_MODES` (see there): what the
        decoder does, which for some policies is not a choice (FREE: ``deferred``; static exit: ``none``)."""
        return "none"

    @property
    def label(self) -> str:
        return self.method

    def columns(self) -> dict[str, Any]:
        """The policy as flat table columns: ``method`` and every parameter that has a plain value."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            if not f.compare:  # objects (a classifier, an estimator, controllers), not settings
                continue
            value = getattr(self, f.name)
            if isinstance(value, VocabPruning):
                out.update(value.columns())
            elif f.name == "vocab":
                out["type_vocab_reduct"] = "none"
            elif isinstance(value, (int, float, str, bool)) or value is None:
                out[f.name] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
                out[f.name] = list(value)
        return out


@dataclass(frozen=True)
class Full(Policy):
    """Every layer for every token: greedy decoding as HF ``generate`` does it (``kv_mode`` ``none``: no layer is
    skipped)."""

    method: ClassVar[str] = "full"
    batched: ClassVar[bool] = True


@dataclass(frozen=True)
class StaticExit(Policy):
    """Every token (the prompt too) runs layers 1..``static_exit_layer``, then the final norm and head
    (``kv_mode`` ``none``: no token ever runs the layers above, so nothing needs their K/V)."""

    static_exit_layer: int
    method: ClassVar[str] = "static"
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        checks.integer("static_exit_layer", self.static_exit_layer, hint=" (a 1-based layer)")

    def check(self, n_layers: int, vocab_size: int) -> None:
        checks.layer("static_exit_layer", self.static_exit_layer, n_layers)

    @property
    def label(self) -> str:
        return f"static@{self.static_exit_layer}"


@_deprecated_aliases(exit_conf_threshold=("threshold", _same), exit_min_layer=("candidate_layer", _same),
                     state_propagation=("kv", _kv_from_state_propagation))
@dataclass(frozen=True)
class Calm(Policy):
    """CALM (Schuster et al. 2022): after each layer >= ``candidate_layer`` compute the ``exit_conf_type``
    confidence and exit once it reaches ``threshold``; with ``vocab``, ``candidate_layer``'s check picks the
    pruned candidates.

    ``softmax``: p1 - p2 of the exit's softmax; ``state``: cos(h_{l-1}, h_l); ``meta``: ``meta_classifier(layer,
    h) -> probability`` (see :func:`effllm.lens.fit_meta_classifier`). ``exit_position_temp`` set: the decaying
    threshold lambda_t = lambda (0.9 + 0.1 exp(-temp t / N)) over the N = max_new_tokens positions (the seed's
    ``correct_by_pos``). ``kv``: ``propagate``: skipped layers get K/V from the copied exit state now (CALM);
    ``deferred``: the next token that runs them runs them on the deferred states too (exact K/V, later).
    """

    exit_conf_type: str = "softmax"
    threshold: float = 0.9
    candidate_layer: int = 1
    exit_position_temp: float | None = None
    kv: str = "propagate"
    vocab: VocabPruning | None = None
    meta_classifier: Callable[[int, torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    method: ClassVar[str] = "calm"

    def __post_init__(self) -> None:
        checks.choice("exit_conf_type", self.exit_conf_type, CONFIDENCE_TYPES)
        object.__setattr__(self, "threshold", check_threshold("threshold", self.threshold))
        checks.integer("candidate_layer", self.candidate_layer, hint=" (a 1-based layer)")
        if self.exit_position_temp is not None:
            object.__setattr__(self, "exit_position_temp",
                               checks.number("exit_position_temp", self.exit_position_temp, low=0))
        checks.choice("kv", self.kv, CALM_KV)
        _vocab(self.vocab)
        if self.exit_conf_type == "meta" and self.meta_classifier is None:
            raise ValueError("exit_conf_type='meta' needs meta_classifier= (see effllm.lens.fit_meta_classifier)")
        if self.exit_conf_type != "meta" and self.meta_classifier is not None:
            raise ValueError(f"meta_classifier is used only with exit_conf_type='meta'; got {self.exit_conf_type!r}")
        if self.vocab is not None and self.exit_conf_type != "softmax":
            raise ValueError(f"vocabulary pruning needs exit_conf_type='softmax'; got {self.exit_conf_type!r}")

    def check(self, n_layers: int, vocab_size: int) -> None:
        checks.layer("candidate_layer", self.candidate_layer, n_layers)
        if self.vocab is not None:
            self.vocab.check(vocab_size)

    @property
    def kv_mode(self) -> str:
        return self.kv

    def threshold_at(self, t: int, max_new_tokens: int) -> float:
        """The threshold in force for the ``t``-th generated token (0-based)."""
        if self.exit_position_temp is None:
            return self.threshold
        return decayed_threshold(self.threshold, t, max_new_tokens, self.exit_position_temp)

    @property
    def label(self) -> str:
        name = f"calm-{self.exit_conf_type}"
        if self.vocab is not None:
            name += f"-{self.vocab.type_vocab_reduct}{self.vocab.k}"
        return name


def decayed_threshold(threshold: float, t: int, max_new_tokens: int, temperature: float = 4.0) -> float:
    """CALM's decaying threshold: lambda_t = lambda (0.9 + 0.1 exp(-temperature t / N)) (seed 001's
    ``exit_position_temp``; CALM uses 4)."""
    return threshold * (0.9 + 0.1 * math.exp(-temperature * t / max_new_tokens))


@_deprecated_aliases(shallow2deep_conf_threshold=("threshold", _same), prune_layer=("candidate_layer", _same))
@dataclass(frozen=True)
class Free(Policy):
    """FREE (Bae et al. 2023): one shallow exit at ``shallow_exit_layer``; a token leaves there when the softmax
    confidence exceeds ``threshold``; the deep layers of stacked shallow tokens run in one synchronized parallel
    pass with the next deep token.

    ``use_adapt_threshold``: FREE's Beta-mixture estimator (:mod:`effllm.decoding.adaptive_threshold`), starting
    from the threshold. The policy object owns one (``adapt_threshold``, made here unless given), so every
    sequence decoded with the same policy adds to its calibration set and is decoded at the threshold the
    sequences before it gave, as the authors' model object does over an evaluation set. ``rollback_threshold``
    (nats): after a synchronized pass, revise from the first stacked token whose deep cross-entropy exceeds it.
    ``vocab``: prune the shallow check's vocabulary, candidates picked by a full check at ``candidate_layer``
    (below the shallow exit; None: the shallow exit's middle layer, max(1, shallow_exit_layer // 2), which
    ``__post_init__`` fills in). ``kv_mode`` is ``deferred``: the deep layers of shallow tokens run in the next
    synchronized pass.
    """

    shallow_exit_layer: int
    threshold: float = 0.9
    shallow2deep_conf_type: str = "softmax"
    use_adapt_threshold: bool = False
    adapt_threshold: Any = field(default=None, compare=False, repr=False)  # an AdaptiveThreshold
    rollback_threshold: float | None = None
    vocab: VocabPruning | None = None
    candidate_layer: int | None = None
    method: ClassVar[str] = "free"

    def __post_init__(self) -> None:
        checks.integer("shallow_exit_layer", self.shallow_exit_layer, hint=" (a 1-based layer)")
        object.__setattr__(self, "threshold", check_threshold("threshold", self.threshold))
        checks.choice("shallow2deep_conf_type", self.shallow2deep_conf_type, ("softmax",))
        if self.rollback_threshold is not None:
            object.__setattr__(self, "rollback_threshold",
                               checks.number("rollback_threshold", self.rollback_threshold, low=0, hint=" (nats)"))
        if self.adapt_threshold is not None and not self.use_adapt_threshold:
            raise ValueError("adapt_threshold= is given but use_adapt_threshold=False: set use_adapt_threshold=True "
                             "to use the estimator")
        if self.use_adapt_threshold and self.adapt_threshold is None:
            object.__setattr__(self, "adapt_threshold", AdaptiveThreshold(initial=self.threshold))
        _vocab(self.vocab)
        if self.vocab is None and self.candidate_layer is not None:
            raise ValueError(f"candidate_layer={self.candidate_layer!r} is used only with vocabulary pruning "
                             f"(vocab=...)")
        if self.candidate_layer is not None:
            checks.integer("candidate_layer", self.candidate_layer, hint=" (a 1-based layer)")
        elif self.vocab is not None:  # where the full check that picks the pruned candidates runs
            object.__setattr__(self, "candidate_layer", max(1, self.shallow_exit_layer // 2))

    def check(self, n_layers: int, vocab_size: int) -> None:
        checks.layer("shallow_exit_layer", self.shallow_exit_layer, n_layers, high=n_layers - 1)
        if self.vocab is not None:
            self.vocab.check(vocab_size)
            checks.layer("candidate_layer", self.candidate_layer, n_layers, high=self.shallow_exit_layer - 1)

    @property
    def kv_mode(self) -> str:
        return "deferred"

    @property
    def label(self) -> str:
        name = f"free@{self.shallow_exit_layer}"
        if self.vocab is not None:
            name += f"-{self.vocab.type_vocab_reduct}{self.vocab.k}"
        if self.use_adapt_threshold:
            name += "-adaptive"
        if self.rollback_threshold is not None:
            name += "-rollback"
        return name


@_deprecated_aliases(skipped_kv=("kv", _same))
@dataclass(frozen=True)
class Skip(Policy):
    """Layer skipping (Glavas et al. 2024, seed 003): each generated token runs a subset of the layers; a skipped
    layer passes its input state on unchanged.

    ``skip_mode``: ``static`` (``skip_pattern`` "every-k" or a list of kept 0-based layers, or ``budget``, a
    fraction of the layers spread evenly, first and last kept), ``random`` (``budget``; a random subset per token,
    seeded by ``seed``), ``controller`` (learned per-token :class:`effllm.controllers.SkipControllers` or its file),
    ``early-exit`` (``budget``: the first round(b L) layers). ``kv``: ``propagate`` (K/V from the copied
    state) or ``none`` (the skipped position is left out of that layer's cache); ``kv_mode`` is ``none`` for
    static and early-exit patterns whatever ``kv`` says (no token ever runs a layer the pattern skips). ``skip_prompt``: the prompt runs
    the same fixed layers (static and early-exit only; default: the prompt runs at full depth, as in the paper).
    """

    skip_mode: str = "static"
    skip_pattern: str | Sequence[int] | None = None
    budget: float | None = None
    controller: Any = field(default=None, compare=False, repr=False)  # SkipControllers or a path
    kv: str = "propagate"
    seed: int = 0
    skip_prompt: bool = False
    method: ClassVar[str] = "skip"

    def __post_init__(self) -> None:
        checks.choice("skip_mode", self.skip_mode, SKIP_MODES)
        checks.choice("kv", self.kv, SKIP_KV)
        checks.integer("seed", self.seed)
        if self.budget is not None:
            check_budget(self.budget)
        if isinstance(self.skip_pattern, torch.Tensor):
            object.__setattr__(self, "skip_pattern", tuple(int(i) for i in self.skip_pattern.flatten().tolist()))
        elif isinstance(self.skip_pattern, (list, range)):
            object.__setattr__(self, "skip_pattern", tuple(self.skip_pattern))
        mode = self.skip_mode
        if mode == "static" and self.skip_pattern is not None and self.budget is not None:
            raise ValueError(f"give either skip_pattern or budget for a static pattern, not both; got "
                             f"skip_pattern={self.skip_pattern!r} and budget={self.budget!r}")
        if mode in ("random", "early-exit") and (self.skip_pattern is not None or self.budget is None):
            raise ValueError(f"skip_mode={mode!r} takes budget= (the fraction of layers each token runs), not "
                             f"skip_pattern; got skip_pattern={self.skip_pattern!r}, budget={self.budget!r}")
        if mode == "controller":
            if self.skip_pattern is not None or self.budget is not None:
                raise ValueError("skip_mode='controller' takes neither skip_pattern nor budget (the controllers' "
                                 f"training sets their budget); got skip_pattern={self.skip_pattern!r}, "
                                 f"budget={self.budget!r}")
            if self.controller is None:
                raise ValueError("skip_mode='controller' needs controller= (SkipControllers, or the path of a saved "
                                 "file)")
        elif self.controller is not None:
            raise ValueError(f"controller= is used only with skip_mode='controller'; got skip_mode={mode!r}")
        if self.skip_prompt and mode not in ("static", "early-exit"):
            raise ValueError(f"skip_prompt=True needs the same layers for every token (static or early-exit); "
                             f"skip_mode={mode!r} decides per token: leave skip_prompt=False")
        if isinstance(self.controller, (str, Path)):
            object.__setattr__(self, "controller", Path(self.controller))

    def check(self, n_layers: int, vocab_size: int) -> None:
        if self.skip_mode in ("static", "early-exit"):
            plan_layers(self, n_layers)

    @property
    def kv_mode(self) -> str:
        return "none" if self.skip_mode in ("static", "early-exit") else self.kv

    @property
    def label(self) -> str:
        if self.skip_mode == "controller":
            return "skip-controller"
        detail = (f"{self.budget:.2f}" if self.budget is not None
                  else ("all" if self.skip_pattern is None else str(self.skip_pattern)))
        return f"skip-{self.skip_mode}@{detail}"


@dataclass(frozen=True)
class SelfSpec(Policy):
    """Self-speculative decoding (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2023): draft
    ``num_draft_tokens`` tokens with layers 1..``draft_exit_layer`` and the exit head (optionally scoring a pruned
    vocabulary), then verify them with one full-depth pass over all drafts, keep the longest prefix the full
    model agrees with and its next token. The drafts' K/V in the shared layers are reused; their deep layers run
    in the verification pass (``kv_mode`` ``deferred``). The tokens are greedy full-depth decoding's; the speed
    depends on the acceptance rate.
    """

    draft_exit_layer: int
    num_draft_tokens: int = 4
    vocab: VocabPruning | None = None
    method: ClassVar[str] = "self-spec"

    def __post_init__(self) -> None:
        checks.integer("draft_exit_layer", self.draft_exit_layer, hint=" (a 1-based layer)")
        checks.integer("num_draft_tokens", self.num_draft_tokens, low=1, high=64)
        _vocab(self.vocab)

    def check(self, n_layers: int, vocab_size: int) -> None:
        checks.layer("draft_exit_layer", self.draft_exit_layer, n_layers, high=n_layers - 1)
        if self.vocab is not None:
            self.vocab.check(vocab_size)

    @property
    def kv_mode(self) -> str:
        return "deferred"

    @property
    def label(self) -> str:
        name = f"self-spec@{self.draft_exit_layer}x{self.num_draft_tokens}"
        if self.vocab is not None:
            name += f"-{self.vocab.type_vocab_reduct}{self.vocab.k}"
        return name
