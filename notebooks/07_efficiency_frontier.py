# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · One model, every method: the efficiency frontier
#
# The five papers behind effllm each compare their method with its own baselines: **early exit** (CALM,
# Schuster et al. 2022; FREE, Bae et al. 2023) stops a token at a shallow layer when it is confident;
# **vocabulary pruning** (Vincenti et al. 2024) makes that confidence check cheap by scoring only the top-k
# candidate tokens; **layer selection** (Glavas et al. 2024) skips layers at decode time; **Wanda**
# (Sun et al. 2024) zeroes half of every weight matrix by |W| · ||x||; **SliceGPT** and **dynamic slicing**
# (Ashkboos et al. 2024; Dumitru et al. 2024) delete principal directions of the residual stream, and
# **ShortGPT** (Men et al. 2024) deletes whole layers. None of them compares with the others. Because every
# method here runs on one model through one adapter, this notebook can: it measures every method's quality
# (held-out perplexity, ROUGE-L consistency with the dense model's generations, optionally HumanEval pass@1
# and a zero-shot task) against four costs (decode tokens/s and prefill time measured on this machine,
# parameters, matmul FLOPs per decoded token), and draws the Pareto front on each cost axis.

# %%
import copy

import pandas as pd
import torch
from IPython.display import display

from effllm import data, execution, frontier, models, plots, pruning, records
from effllm.adapters import get_adapter
from effllm.decoding import Calm, Free, Skip, StaticExit, VocabPruning
from effllm.experiments.frontier import FrontierSettings, FrontierTable
from effllm.experiments.prompts import prompt_budget, prompt_format, task_prompts
from effllm.experiments.session import open_session
from effllm.lens import cached_linear_exits
from effllm.ltt import calibrate_threshold
from effllm.slicing import layer_scores, slice_fractions, slice_model

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
calibration_data = "python-docs"  # pruning / slicing calibration corpus (train split)
calibration_samples = 8  # calibration windows
calibration_seq_len = 128  # tokens per calibration window
eval_data = "python-docs"  # held-out perplexity corpus (test split)
eval_windows = 4  # perplexity windows
eval_seq_len = 256  # tokens per perplexity window
n_prompts = 32  # decode prompts (arithmetic questions and HumanEval prompts, alternating)
max_new_tokens = 32  # new tokens per decode prompt (no EOS stop: every row does the same work)
speed_prompts = 8  # the first prompts, timed in `rounds` rounds back to back with the dense model
rounds = 5  # timing rounds; a speed ratio is their median
prefill_tokens = 128  # prompt length of the prefill timing
prefill_min_run_time = 0.5  # seconds of repeated prefill per row (median kept)
slice_levels = [0.3]  # mean slice fractions M of constant and dynamic slicing
slice_amplitude = 0.1  # A of dynamic slicing (capped at M, so that no layer gets a negative fraction)
shortgpt_fraction = 0.1  # fraction of layers ShortGPT removes
skip_budget = 0.8  # static layer skipping: fraction of layers every decoded token runs
use_fitted_exits = True  # least-squares exits (effllm.lens) for CALM / FREE; False: the plain logit lens
# The same model with exits trained by effllm.training (load_model("<model>-ee"), trained on first use): its static
# exit and FREE rows stand beside the fitted exits' (None: no trained rows)
trained_model = "smollm2-135m-ee"
k = 256  # candidate tokens of vocabulary pruning (fixed k)
# Learn-then-Test prompts (disjoint from the decode prompts); with delta = epsilon = 0.2 it needs at least 8
# prompts to certify anything (0.8^n < epsilon), however small the measured risk.
calibration_prompts = 8
calibration_tokens = 8  # new tokens per calibration prompt
ltt_candidates = [0.9, 0.6, 0.3]  # thresholds Learn-then-Test tests, from the safest down
ltt_delta = 0.2  # allowed mean disagreement with the full model (1 - ROUGE-L)
ltt_epsilon = 0.2  # allowed probability that the risk exceeds delta
humaneval_problems = 0  # HumanEval pass@1 on the first N problems per row (0: skip; minutes per row here)
humaneval_max_new_tokens = 96
# HumanEval runs the model's programs on this machine (confined; README "Running model-written code"): opt in
# with True (or EFFLLM_ALLOW_CODE_EXECUTION=1); with humaneval_problems > 0 and no opt-in the notebook stops here.
allow_code_execution = False
# Built-in lm-eval task (effllm.zeroshot) for the model-level rows; None skips it, as the default profile does
# (lm-eval takes tens of seconds per model on a 2-core CPU, there are 10 models, and notebook 06 scores prose-mc).
zero_shot_task = None
zero_shot_limit = 60  # items (None: all)
batch_size = 8
# the rows timed at batch 1 (label prefixes or fnmatch patterns, "!pattern" excludes; None: every row), all in one
# interleaved run with the dense model timed once; the others keep their counted costs and quality, no speed
timed_rows = ["dense", "SliceGPT", "ShortGPT", "FREE", "!* + *"]
quality_bar = 0.9  # ROUGE-L consistency a row must reach to count as "keeps the output" in the summary

# %%
if humaneval_problems:  # refuse now, not after the models are built and timed
    execution.require_code_execution(allow_code_execution)
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
dense, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
dense.eval()
adapter = get_adapter(dense)
n_layers, hidden = adapter.num_layers, adapter.hidden_size
exit_min_layer = n_layers // 2  # CALM checks from the middle layer on (the early-exit benchmark's setting)
shallow_exit_layer = (2 * n_layers) // 3  # FREE's shallow exit
prune_layer = min(exit_min_layer, shallow_exit_layer - 1)  # FREE + vocabulary pruning picks candidates here
calibration = data.calibration(calibration_data, tokenizer, n_samples=calibration_samples,
                               seq_len=calibration_seq_len, seed=seed, split="train").to(device)
eval_tokens = data.calibration_tokens(eval_data, tokenizer, split="test")
fmt = prompt_format(dense, tokenizer, model_name)
budget = prompt_budget(dense, max(max_new_tokens, calibration_tokens))
prompts = [p.to(device) for p in task_prompts(tokenizer, "builtin", n_prompts, fmt=fmt, max_tokens=budget)]
ltt_prompts = [p.input_ids.to(device) for p in task_prompts(tokenizer, "builtin", calibration_prompts,
                                                             offset=n_prompts, fmt=fmt, max_tokens=budget)]
prefill_ids = data.calibration(eval_data, tokenizer, n_samples=1, seq_len=prefill_tokens, seed=seed).to(device)
transform = cached_linear_exits(dense, tokenizer, model_name) if use_fitted_exits else None
transform_flops = 2 * hidden * hidden if transform is not None else 0  # one d x d exit map per check
setting = (f"{machine} · {n_prompts} prompts to the end of sequence (at most {max_new_tokens} new tokens), greedy; "
           f"speed paired vs dense at batch 1 · perplexity: {eval_data} test {eval_windows}x{eval_seq_len}")
print(f"{model_name}: {n_layers} layers, d = {hidden}; CALM from layer {exit_min_layer}, FREE shallow exit "
      f"{shallow_exit_layer}; exits: {'fitted linear maps' if transform is not None else 'logit lens'}; {setting}")

# %% [markdown]
# ## Step 1: the measurement
#
# Every row decodes the same prompts with the same engine (`effllm.decoding.decode` with the row's policy),
# greedy, each prompt to its end of sequence (at most `max_new_tokens`); quality decodes every prompt in batches
# (each row as decoded alone). Speed is timed at batch 1 on the first `speed_prompts` prompts in `rounds` rounds,
# one call per (row or dense model, prompt), the calls of a round in a shuffled order; the speed ratio is paired:
# per prompt the median over rounds of the row's tokens/s over the dense model's on the same prompt in the same
# round, then the mean over prompts, with a 95% bootstrap interval over prompts. Quality against the dense model is ROUGE-L over the generated
# token ids (with a 95% interval over prompts) and per-position token agreement; FLOPs per decoded token come
# from `effllm.frontier.decode_flops`, which counts the layers each token actually ran and what its skipped
# layers still cost (K/V projections under state propagation, the whole layer for FREE's deferred synchronized
# pass). A model-level method (pruning, slicing, layer removal) also gets held-out perplexity, prefill time and,
# when enabled, HumanEval pass@1 and zero-shot accuracy; a decode-time method (early exit, skipping) inherits
# its base model's parameters and prefill time (the prompt runs at full depth) and has no perplexity of its own.

# %%
measurement = FrontierSettings(
    eval_seq_len=eval_seq_len, eval_windows=eval_windows, batch_size=batch_size, speed_prompts=speed_prompts,
    rounds=rounds, prefill_min_run_time=prefill_min_run_time, zero_shot_task=zero_shot_task,
    zero_shot_limit=zero_shot_limit, humaneval_problems=humaneval_problems,
    humaneval_max_new_tokens=humaneval_max_new_tokens, allow_code_execution=allow_code_execution,
    transform_flops=transform_flops, timed=timed_rows)
table_rows = FrontierTable(dense, tokenizer, prompts, max_new_tokens, prefill_ids=prefill_ids, eval_tokens=eval_tokens,
                           settings=measurement, exit_transform=transform)
dense_row = table_rows.add_model("dense", "dense", dense)

# %% [markdown]
# ## Step 2: model-level methods
#
# Wanda at 50% unstructured and 2:4 (stored dense: the parameter count stays, the nonzero count halves, and
# on a CPU the dense kernels run just as long; notebook 05 measures what sparse kernels give); SliceGPT with
# a constant slice fraction and dynamic slicing by layer redundancy at each level M; ShortGPT removing the
# layers of lowest block influence. Each is applied to a fresh copy of the dense model, calibrated on the same
# windows.

# %%
lr_scores = layer_scores(dense, calibration, "lr", batch_size=batch_size)
bi_scores = layer_scores(dense, calibration, "bi", batch_size=batch_size)
kept = {}  # models the combinations reuse


def variant(label, family, transform_model, keep=None, **extra):
    model = copy.deepcopy(dense)
    transform_model(model)
    table_rows.add_model(label, family, model, **extra)
    if keep:
        kept[keep] = model


variant("Wanda 50%", "wanda", lambda m: pruning.prune(m, "wanda", 0.5, calibration=calibration,
                                                      batch_size=batch_size, progress=False), keep="wanda50")
variant("Wanda 2:4", "wanda", lambda m: pruning.prune(m, "wanda", None, pattern="2:4", calibration=calibration,
                                                      batch_size=batch_size, progress=False))
for level in slice_levels:
    variant(f"SliceGPT M={level}", "slicegpt", lambda m, level=level: slice_model(
        m, calibration, mean=level, batch_size=batch_size), keep="sliced" if level == min(slice_levels) else None)
    amplitude = min(slice_amplitude, level)
    fractions = slice_fractions(lr_scores, level, amplitude)
    variant(f"dynamic M={level}", "dynamic", lambda m, fractions=fractions: slice_model(
        m, calibration, fractions=fractions, batch_size=batch_size), amplitude=amplitude)
removed = round(shortgpt_fraction * n_layers)
variant(f"ShortGPT -{removed} layers", "shortgpt", lambda m: slice_model(
    m, calibration, mean=removed / n_layers, method="shortgpt", scores=bi_scores, batch_size=batch_size))

# %% [markdown]
# ## Step 3: decode-time methods, at calibrated thresholds
#
# CALM (softmax confidence p1 - p2 from layer `exit_min_layer` on) and FREE (one shallow exit, deep layers
# synchronized in parallel) at the lowest threshold that Learn-then-Test certifies on separate calibration
# prompts: with probability at least 1 - epsilon the mean disagreement (1 - ROUGE-L with the full model) stays
# below delta. When no candidate is certified the safest candidate is used and the row says so. The same
# threshold is then used with vocabulary pruning (fixed k candidates picked at the first checked layer).
# Static layer skipping runs a fixed, evenly spread subset of layers for every decoded token.

# %%
thresholds = {}
for name, base in [("calm", Calm("softmax", 0.9, exit_min_layer)), ("free", Free(shallow_exit_layer, 0.9))]:
    ltt = calibrate_threshold(dense, ltt_prompts, calibration_tokens, ltt_candidates, ltt_delta, ltt_epsilon, base,
                              distance="rougeL", decode=tokenizer.decode, exit_transform=transform,
                              progress=False)
    certified = ltt.threshold is not None
    thresholds[name] = (ltt.threshold if certified else max(ltt_candidates), certified)
    print(f"{name}: Learn-then-Test on {ltt.n} prompts (delta={ltt_delta}, epsilon={ltt_epsilon}) -> "
          + (f"threshold {ltt.threshold}" if certified else f"none certified; using {max(ltt_candidates)}"))
    display(ltt.table.round(4))

calm_threshold, calm_certified = thresholds["calm"]
free_threshold, free_certified = thresholds["free"]
vocab = VocabPruning("fixed", k)
calm = Calm("softmax", calm_threshold, exit_min_layer)
calm_vocab = Calm("softmax", calm_threshold, exit_min_layer, vocab=vocab)
free = Free(shallow_exit_layer, free_threshold)
free_vocab = Free(shallow_exit_layer, free_threshold, vocab=vocab, candidate_layer=prune_layer)
skip = Skip("static", budget=skip_budget)

table_rows.add_decoder(f"CALM λ={calm_threshold}", "calm", dense, calm, "dense", threshold=calm_threshold,
                       certified=calm_certified)
table_rows.add_decoder(f"CALM λ={calm_threshold} + vocab k={k}", "calm", dense, calm_vocab, "dense",
                       threshold=calm_threshold, certified=calm_certified)
table_rows.add_decoder(f"FREE λ={free_threshold}", "free", dense, free, "dense", threshold=free_threshold,
                       certified=free_certified)
table_rows.add_decoder(f"FREE λ={free_threshold} + vocab k={k}", "free", dense, free_vocab, "dense",
                       threshold=free_threshold, certified=free_certified)
table_rows.add_decoder(f"static skip {skip_budget:.0%} layers", "skip", dense, skip, "dense")

# %% [markdown]
# ### The same decoders on the exit-trained model
#
# `trained_model` is this model with an exit trained at FREE's shallow layer (effllm.training; the backbone is
# unchanged, so its full-depth output is the dense model's). Its static exit and FREE rows use the trained exit in
# place of the fitted linear map, FREE at the threshold Learn-then-Test certifies for the trained exit on the same
# calibration prompts; the exit's own matmuls count in FLOPs per token.

# %%
if trained_model:
    ee, _ = models.load_model(trained_model, dtype=dtype, device=device)
    trained_exits = records.EXITS.get(ee)
    if trained_exits is None or not trained_exits.layers:
        raise ValueError(f"{trained_model!r} has no trained exit modules to compare (exits: {trained_exits!r})")
    trained_layer = max(layer for layer in trained_exits.layers if layer < n_layers)
    trained_flops = trained_exits.flops_per_check(trained_layer)
    ltt = calibrate_threshold(ee, ltt_prompts, calibration_tokens, ltt_candidates, ltt_delta, ltt_epsilon,
                              Free(trained_layer, 0.9), distance="rougeL", decode=tokenizer.decode,
                              progress=False)
    trained_threshold, trained_certified = ((ltt.threshold, True) if ltt.threshold is not None
                                            else (max(ltt_candidates), False))
    print(f"{trained_model}: trained exit at layer {trained_layer} ({trained_flops / 1e6:.1f} MFLOPs a check); FREE: "
          f"Learn-then-Test on {ltt.n} prompts -> " + (f"threshold {ltt.threshold}" if trained_certified
                                                       else f"none certified; using {max(ltt_candidates)}"))
    table_rows.add_decoder(f"static@{trained_layer} (trained exit)", "static", ee, StaticExit(trained_layer), "dense",
                           exit_transform=None, transform_flops=trained_flops, exits="trained")
    table_rows.add_decoder(f"FREE λ={trained_threshold} (trained exit)", "free", ee,
                           Free(trained_layer, trained_threshold), "dense", exit_transform=None,
                           transform_flops=trained_flops, threshold=trained_threshold, certified=trained_certified,
                           exits="trained")
    del ee

# %% [markdown]
# ## Step 4: combinations
#
# Methods of different kinds stack: a Wanda-pruned model can still exit early (with the exits fitted on the
# dense model and the dense model's calibrated threshold, so this row shows what transfers without
# recalibrating), and a sliced model can still skip layers.

# %%
table_rows.add_decoder(f"Wanda 50% + CALM + vocab k={k}", "combination", kept["wanda50"], calm_vocab, "Wanda 50%",
                       threshold=calm_threshold, certified=calm_certified)
table_rows.add_decoder(f"SliceGPT M={min(slice_levels)} + skip {skip_budget:.0%}", "combination", kept["sliced"], skip,
                       f"SliceGPT M={min(slice_levels)}")
kept.clear()

# %% [markdown]
# ## Step 5: the frontier
#
# One figure per cost axis. Left: consistency with the dense model's generations (every row); right:
# held-out perplexity (model-level rows; log scale, lower is better). Filled markers with black edges and the
# dashed step line are the Pareto front: no other row is both cheaper (or faster) and better. Speed is the paired
# ratio to the dense model with its 95% interval over prompts as whiskers; the absolute tokens/s and the
# single-shot prefill time stay in the table as extra columns, not as axes (noise between unpaired measurements
# would rank the rows).

# %%
table = table_rows.frame()
cost_axes = {"speedup_vs_dense": ("paired speed ratio vs dense (x), 95% CI over prompts (higher is better)", False),
             "parameters_M": ("parameters (millions)", True),
             "gflops_per_token": ("matmul GFLOPs per decoded token", True)}
for cost, (_, minimize) in cost_axes.items():
    table[f"front_{cost}"] = frontier.pareto_front(table, cost, "rougeL_vs_dense", minimize_cost=minimize)
with pd.option_context("display.max_columns", None, "display.width", 200):
    display(table.drop(columns=[c for c in table.columns if c.startswith("front_")]).round(3))

for cost, (xlabel, minimize) in cost_axes.items():
    fig, axes = plots.new_figure(1, 2, figsize=(12, 4.8))
    for ax, quality, maximize, ylabel in [(axes[0], "rougeL_vs_dense", True, "ROUGE-L vs dense generations (mean)"),
                                          (axes[1], "perplexity", False, f"perplexity ({eval_data} test)")]:
        shown = table[table[quality].notna() & table[cost].notna()]  # rows not timed are off the speed axes
        front = frontier.pareto_front(shown, cost, quality, minimize_cost=minimize, maximize_quality=maximize)
        for family, group in shown.groupby("family", sort=False):
            ax.scatter(group[cost], group[quality], color=plots.colour(family), label=family, s=36,
                       edgecolors=["black" if front[i] else "none" for i in group.index], linewidths=1.2)
            if f"{cost}_ci_low" in group:  # whiskers: the 95% interval over prompts of the paired ratio
                ax.errorbar(group[cost], group[quality], xerr=[(group[cost] - group[f"{cost}_ci_low"]).clip(lower=0),
                                                               (group[f"{cost}_ci_high"] - group[cost]).clip(lower=0)],
                            fmt="none", ecolor=plots.colour(family), elinewidth=0.8, capsize=2)
        line = shown[front].sort_values(cost)
        # The staircase of what is reachable: a cost holds its quality to the right, a benefit to the left.
        ax.step(line[cost], line[quality], where="post" if minimize else "pre", color="0.3", linestyle="--",
                linewidth=1)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if cost == "speedup_vs_dense":
            ax.axvline(1.0, color="0.6", ls=":", lw=1)
        if quality == "perplexity":
            ax.set_yscale("log")
        plots.label_points(ax, shown[cost], shown[quality], shown.method)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Efficiency frontier: quality against {xlabel.split(' (')[0]}\n"
                 + plots.provenance(model=model_name, data=f"{calibration_data} calibration, built-in prompts",
                                    extra=setting), fontsize="small")
    untimed = table[table.n_speed_prompts == 0].method
    if cost == "speedup_vs_dense" and len(untimed):
        fig.text(0.01, 0.005, "not timed (off these axes; counted costs on the parameter and FLOP figures): "
                 + ", ".join(untimed), fontsize=6, color="0.35")
    plots.save_figure(fig, f"07_frontier_{cost}", table=table)

# %% [markdown]
# On the speed figure, look for the rows right of 1 (whiskers included) that stay near ROUGE-L 1: those speed
# decoding without changing the output. On the parameter and FLOP figures, early exit and skipping sit at the
# dense parameter count (they change what runs, not what is stored), while slicing and ShortGPT move left and
# pay in perplexity. The paragraphs below are computed from the table.

# %% [markdown]
# ## What the frontier shows

# %%
def names(frame):
    return ", ".join(frame.method) if len(frame) else "none"


decode_front = table[table.front_speedup_vs_dense].sort_values("speedup_vs_dense")
keeps = table[(table.rougeL_vs_dense >= quality_bar) & (table.method != "dense") & table.speedup_vs_dense.notna()]
fastest = keeps.loc[keeps.speedup_vs_dense.idxmax()] if len(keeps) else None
overall = table.loc[table.speedup_vs_dense.idxmax()]


def paired(r):
    if not r.n_speed_prompts:
        return "not timed (timed_rows)"
    return (f"{r.speedup_vs_dense:.2f}x dense, paired, 95% CI over {r.n_speed_prompts} prompts "
            f"{r.speedup_vs_dense_ci_low:.2f}-{r.speedup_vs_dense_ci_high:.2f}")


print(f"1. Speed. On {machine}, the dense model decodes {dense_row['dense_tokens_per_s']:.1f} tokens/s (absolute, "
      f"this machine). The Pareto front of paired decode speed against ROUGE-L consistency holds: "
      f"{names(decode_front)}. "
      + (f"The fastest row that keeps ROUGE-L >= {quality_bar} is {fastest.method} ({paired(fastest)}, ROUGE-L "
         f"{fastest.rougeL_vs_dense:.3f}). " if fastest is not None else
         f"No method other than dense keeps ROUGE-L >= {quality_bar}. ")
      + f"The fastest row overall is {overall.method} ({paired(overall)}, ROUGE-L {overall.rougeL_vs_dense:.3f}).\n")

model_rows = table[table.perplexity.notna() & (table.method != "dense")]
smaller = model_rows[model_rows.parameters_M < dense_row["parameters_M"]]
size_front = model_rows[frontier.pareto_front(model_rows, "parameters_M", "perplexity", maximize_quality=False)]
slicing = table[table.family.isin(["slicegpt", "dynamic"])].assign(
    kind=lambda t: t.method.str.split(" ").str[0], level=lambda t: t.method.str.split("=").str[1].astype(float))
pivot = slicing.pivot(index="level", columns="kind", values="perplexity")
dynamic_wins = pivot[pivot["dynamic"] < pivot["SliceGPT"]].index.tolist()
wanda = table[table.family == "wanda"]
print(f"2. Size. Dense: {dense_row['parameters_M']:.1f} M parameters, perplexity {dense_row['perplexity']:.2f}. "
      f"Wanda keeps every stored parameter but zeroes, of all parameters (embeddings are not pruned), "
      + ", ".join(f"{1 - r.nonzero_parameters_M / r.parameters_M:.0%} ({r.method}, perplexity {r.perplexity:.2f})"
                  for r in wanda.itertuples())
      + f". Of the methods that store fewer parameters ({names(smaller)}), the best perplexity is "
      + (f"{smaller.loc[smaller.perplexity.idxmin()].method} ({smaller.perplexity.min():.2f} at "
         f"{smaller.loc[smaller.perplexity.idxmin()].parameters_M:.1f} M)" if len(smaller) else "-")
      + f"; the parameter/perplexity front among model-level methods is {names(size_front)}. Dynamic slicing beats "
      f"constant slicing on perplexity at M = {dynamic_wins} ({len(dynamic_wins)} of {len(pivot)} levels)."
      + (f" Zero-shot {zero_shot_task} accuracy ({zero_shot_limit or 'all'} items; dense "
         f"{dense_row[f'accuracy_{zero_shot_task}']:.3f}): "
         + ", ".join(f"{r['method']} {r[f'accuracy_{zero_shot_task}']:.3f}" for _, r in model_rows.iterrows())
         + "." if zero_shot_task else "") + "\n")

trained_rows = table[table["exits"] == "trained"] if "exits" in table else table.iloc[:0]
exit_rows = table[table.family.isin(["calm", "free"]) & ~table.index.isin(trained_rows.index)]
calm_rows = exit_rows[exit_rows.method.str.startswith("CALM")]
free_rows = exit_rows[exit_rows.method.str.startswith("FREE")]


def vocab_effect(group):
    if len(group) != 2:
        return "-"
    plain, pruned = group.iloc[0], group.iloc[1]
    speed = (f"{pruned.speedup_vs_dense / plain.speedup_vs_dense:.2f}x the paired speed ratio vs dense and "
             if plain.n_speed_prompts and pruned.n_speed_prompts else "")
    return f"{speed}{pruned.gflops_per_token / plain.gflops_per_token:.2f}x the FLOPs per token of the same method without it"


combos = table[table.family == "combination"]
print("3. Early exit. "
      + " ".join(f"{r.method}: {r.avg_layers:.1f} of {n_layers} layers per token on average, {paired(r)}, "
                 f"ROUGE-L {r.rougeL_vs_dense:.3f}"
                 f"{'' if r.certified else ' (threshold not certified)'}." for r in exit_rows.itertuples())
      + f" Vocabulary pruning (k={k}) gives CALM {vocab_effect(calm_rows)}, and FREE {vocab_effect(free_rows)}. "
      + " ".join(f"Combination {r.method}: {paired(r)}, {r.gflops_per_token:.3f} GFLOPs per token, ROUGE-L "
                 f"{r.rougeL_vs_dense:.3f}."
                 for r in combos.itertuples()))
if len(trained_rows):
    print("4. Exit training (the same rows through the trained exit of " + str(trained_model) + "). "
          + " ".join(f"{r.method}: {r.avg_layers:.1f} layers per token, {paired(r)}, ROUGE-L "
                     f"{r.rougeL_vs_dense:.3f} "
                     f"[{r.rougeL_vs_dense_ci_low:.3f}, {r.rougeL_vs_dense_ci_high:.3f}], n = {r.n_prompts} prompts."
                     for r in trained_rows.itertuples()))

# %% [markdown]
# Read the printed paragraphs with the measurement in mind: tokens/s on a busy CPU moves by tens of
# percent between runs (hence the paired ratios, each row against the dense model on the same prompts in the same
# rounds, with their intervals over prompts), ROUGE-L comes from a few short
# generations, and CALM / FREE pay for every confidence check with an LM-head product, which vocabulary
# pruning makes cheap. The FLOP column is the machine-independent cost; the tokens/s column is what this
# machine actually delivered.
