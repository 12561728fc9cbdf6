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
# # 01 · Early exit: static exits, CALM and FREE on a decoder-only model
#
# An early-exit decoder stops the forward pass of a token at an intermediate layer when it is confident
# enough and emits that layer's prediction. **Static exiting** always stops at the same layer. **CALM**
# (Schuster et al., NeurIPS 2022) checks a confidence after every layer from `exit_min_layer` on (the
# softmax gap p1 - p2, the cosine between consecutive states, or a small classifier), copies the exit
# state upward so later tokens still find keys and values in the skipped layers, and calibrates its
# threshold with Learn-then-Test so that the output stays within a chosen distance `delta` of the full
# model's with probability 1 - `epsilon`. **FREE** (Bae et al., EMNLP 2023; seed 001) keeps a single
# shallow exit, stacks the states of tokens that left there, and runs the deep layers on all of them in one
# *synchronized parallel* pass at the next deep token; its threshold adapts online from a Beta mixture of
# the confidences of agreeing and disagreeing tokens. The FREE authors list "CALM and FREE on decoder-only
# models" as not done; here they run on the embedded SmolLM2-135M, with least-squares fitted exits (Din et
# al. 2023) that make the intermediate layers predictive, and every speed is **measured** on this machine.

# %%
import matplotlib as mpl
import pandas as pd
import torch
from IPython.display import HTML, display

from effllm import models, plots, records
from effllm.adapters import get_adapter
from effllm.data import calibration as calibration_windows
from effllm.decoding import AdaptiveThreshold, Calm, Free, StaticExit, decode
from effllm.decoding.batched import decode_rows
from effllm.experiments.analyses import exit_histogram, token_exits
from effllm.experiments.prompts import prompt_budget, prompt_format, task_prompts
from effllm.experiments.runs import reference_quality, run_policies
from effllm.experiments.session import open_session
from effllm.lens import cached_linear_exits, fit_meta_classifier, logit_lens_agreement
from effllm.ltt import calibrate_threshold, disagreement
from effllm.ltt import n_to_certify as ltt_n_to_certify

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id (T5 in `paper`)
seed = 0
figures_dir = None  # None: the repository's figures/ folder
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
prompt_data = ["arithmetic+humaneval+docstrings"]  # builtin (arithmetic + HumanEval), tasks joined by "+" (they take turns) | squad | samsum (hub, `paper` profile)
n_prompts = 24  # timed prompts per data set, decoded by every setting
max_new_tokens = 48  # answer limit: decoding stops at the end of sequence or after this many tokens
rounds = 5  # interleaved timing rounds; a speed ratio is paired per prompt (median over rounds), then averaged
speed_prompts = 8  # the first prompts are timed at batch 1 in every round (quality: every prompt, in batches)
timed_settings = ["FREE 0.9"]  # the settings timed at batch 1 (label prefixes); None: all; the rest: quality only
use_fitted_exits = True  # least-squares exits (decoder-only models); False: the plain logit lens
lens_corpora = ["python-docs", "python-code"]  # text for the logit-lens agreement
lens_sequences = 1  # windows per corpus
lens_seq_len = 128  # tokens per window
exit_min_layer = None  # CALM's first checked layer; None: 2 L // 3 (fitted exits agree poorly below it)
shallow_exit_layer = None  # FREE's shallow exit; None: 2 L // 3
static_exit_layers = [20]  # static exits to compare; None: L // 2, 2 L // 3, L - 2
thresholds = [0.9, 0.7]  # CALM (softmax, meta) / FREE confidence thresholds for the speed-quality curve
state_thresholds = [0.99]  # CALM's hidden-state saturation cos(h_{l-1}, h_l)
exit_position_temp = 4.0  # CALM's decaying threshold (the seed's temperature), at the middle threshold
meta_windows = 2  # calibration windows per corpus to fit CALM's meta classifier (0: no meta rows)
rollback_threshold = 2.0  # FREE rollback: deep cross-entropy (nats) above which a shallow token is revised
calibration_prompts = 12  # Learn-then-Test prompts (disjoint from the timed ones)
calibration_tokens = 12
ltt_candidates = [0.99, 0.95, 0.9]
ltt_distance = "rougeL"  # disagreement with the full model: rougeL (1 - ROUGE-L) | token (mismatch rate)
ltt_delta = 0.25  # allowed mean disagreement with the full model ...
ltt_epsilon = 0.1  # ... with probability at least 1 - epsilon
adaptive_prompts = 12  # prompts decoded in sequence while FREE's threshold adapts
adaptive_tokens = 24
# The same model with exits trained by effllm.training (load_model("<model>-ee"), trained on first use; notebook 08
# shows the training): static / CALM / FREE run through its trained exit beside the fitted exits (None: skip)
trained_model = None

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
L = adapter.num_layers
exit_min_layer = exit_min_layer or max(1, (2 * L) // 3)
shallow_exit_layer = shallow_exit_layer or (2 * L) // 3
static_exit_layers = static_exit_layers or sorted({max(1, L // 2), max(1, (2 * L) // 3), max(1, L - 2)})
encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
transform = cached_linear_exits(model, tokenizer, model_name) if use_fitted_exits and not encoder_decoder else None
print(f"{model_name}: {L} decoder layers, CALM checks from layer {exit_min_layer}, FREE exits at "
      f"{shallow_exit_layer}; exits: {'fitted (least squares)' if transform is not None else 'logit lens'}; {machine}")

# %% [markdown]
# ## 1. Do intermediate layers predict the final token? Logit lens before and after fitted exits
#
# For every position of a few windows of built-in text, the argmax of `LM_head(final_norm(h_l))` is
# compared with the model's final argmax: without training (the logit lens), and after the least-squares
# map h_l -> h_L fitted once per model and cached beside it.

# %%
if encoder_decoder:
    lens = pd.DataFrame(columns=["layer", "agreement", "exits"])
    print("The logit-lens table needs a decoder-only model (effllm.lens runs decoder-only forward passes); "
          "skipped for this encoder-decoder checkpoint, whose exits are trained with the model.")
else:
    windows = torch.cat([calibration_windows(c, tokenizer, lens_sequences, lens_seq_len, seed=seed)
                         for c in lens_corpora])
    before = logit_lens_agreement(model, windows, progress=False).assign(exits="logit lens")
    tables = [before]
    if transform is not None:
        tables.append(logit_lens_agreement(model, windows, progress=False, exit_transform=transform)
                      .assign(exits="fitted (least squares)"))
    lens = pd.concat(tables, ignore_index=True)
    display(lens.pivot(index="exits", columns="layer", values="agreement").round(2))

    fig, ax = plots.new_figure()
    for name, group in lens.groupby("exits", sort=False):
        ax.plot(group.layer, group.agreement, marker="o", markersize=3, label=name)
    ax.axvline(exit_min_layer, color="0.6", ls=":", lw=1, label=f"CALM's first check (layer {exit_min_layer})")
    plots.layer_axis(ax)
    ax.set_ylabel("top-1 agreement with the last layer")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Exit agreement per layer, before and after fitted exits\n" + plots.provenance(
        model=model_name, data=", ".join(lens_corpora), extra=f"n = {windows.numel()} tokens"))
    plots.save_figure(fig, "01_exit_agreement", table=lens)

# %% [markdown]
# The dotted line marks CALM's first checked layer. Where the fitted curve lies above the logit lens, an
# exit at that layer emits the final token more often; the gap between either curve and 1 is the room for
# disagreement that the confidence threshold has to filter out.

# %%
if len(lens):
    at = lens[lens.layer == exit_min_layer].set_index("exits").agreement
    print("agreement at layer", exit_min_layer, ":", ", ".join(f"{k} {v:.2f}" for k, v in at.items()))

# %% [markdown]
# ## 2. Speed and quality over thresholds
#
# Every setting decodes the same prompts, greedy, to the end of each answer (end of sequence or `max_new_tokens`);
# quality comes from every prompt, decoded in batches. Speed is timed at batch 1 on the first `speed_prompts`
# prompts in `rounds` interleaved rounds (the settings `timed_settings` names, and the engine at full depth): per
# prompt, tokens/s relative to the full-depth decoding of the same prompt in the same round (the papers' ratio), the
# median over rounds; the axis is the mean over prompts of these paired ratios (settings scored for quality only are
# on the right panel, by layers per token),
# with its 95% bootstrap interval over prompts as error bars; quality is ROUGE-L over token ids against the engine's
# full-depth output (the mean over prompts with its 95% bootstrap interval). CALM runs with three confidence
# measures (softmax gap, hidden-state saturation, and the meta classifier fitted here), once with the decaying
# threshold; FREE with fixed thresholds, the adaptive threshold and rollback.

# %%
fmt = prompt_format(model, tokenizer, model_name)
budget = prompt_budget(model, max(max_new_tokens, calibration_tokens, adaptive_tokens))
prompts, calibration_set, adaptive_set = [], [], []
for name in prompt_data:
    prompts += [p.to(device) for p in task_prompts(tokenizer, name, n_prompts, fmt=fmt, max_tokens=budget)]
    calibration_set += [p.input_ids.to(device) for p in task_prompts(
        tokenizer, name, calibration_prompts, offset=n_prompts, fmt=fmt, max_tokens=budget)]
    adaptive_set += [p.input_ids.to(device) for p in task_prompts(
        tokenizer, name, adaptive_prompts, offset=n_prompts + calibration_prompts, fmt=fmt, max_tokens=budget)]
print(f"{len(prompts)} timed prompts ({fmt} format), {len(calibration_set)} calibration prompts, "
      f"{len(adaptive_set)} prompts for the adaptive threshold")

meta = None
if meta_windows and not encoder_decoder:
    meta_ids = torch.cat([calibration_windows(c, tokenizer, meta_windows, lens_seq_len, seed=seed + 1)
                          for c in lens_corpora])
    meta = fit_meta_classifier(model, meta_ids, exit_transform=transform, min_layer=exit_min_layer,
                               progress=False).bind(model)
middle = thresholds[len(thresholds) // 2]
settings = {f"static@{e}": StaticExit(e) for e in static_exit_layers}
settings |= {f"CALM softmax {t}": Calm("softmax", t, exit_min_layer) for t in thresholds}
settings[f"CALM softmax {middle} decaying"] = Calm("softmax", middle, exit_min_layer,
                                                   exit_position_temp=exit_position_temp)
settings |= {f"CALM state {t}": Calm("state", t, exit_min_layer) for t in state_thresholds}
if meta is not None:
    settings |= {f"CALM meta {t}": Calm("meta", t, exit_min_layer, meta_classifier=meta) for t in thresholds}
settings |= {f"FREE {t}": Free(shallow_exit_layer, t) for t in thresholds}
settings["FREE adaptive"] = Free(shallow_exit_layer, middle, use_adapt_threshold=True)
rollback_at = thresholds[-1]
settings[f"FREE {rollback_at} + rollback"] = Free(shallow_exit_layer, rollback_at, rollback_threshold=rollback_threshold)
run = run_policies(model, tokenizer, prompts, settings, max_new_tokens, exit_transform=transform, rounds=rounds,
                   speed_prompts=speed_prompts, timed=timed_settings, hf=False)  # speed vs the engine's full depth
curve = run.summary
plots.save_table(run.items.drop(columns="text", errors="ignore"), "01_generation_items")  # per prompt, per setting
# CALM and FREE both name their exit threshold `threshold`: one column for both
curve["variant"] = curve.label.str.replace(r" [0-9.]+$", "", regex=True).str.replace(r" [0-9.]+ ", " ", regex=True)
display(curve[["label", "method", "threshold", "speedup_vs_full", "speedup_vs_full_ci_low", "speedup_vs_full_ci_high",
               "avg_layers", "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high",
               "identical_to_full"]].round(3))

# %% [markdown]
# Against the tasks' own reference answers (the seeds report these: ROUGE-L against SAMSum's summaries, SQuAD exact
# match and F1 against every gold answer), per task, with n and the 95% interval. On the built-in prompts the
# references are the arithmetic answers and HumanEval's canonical solutions; a 12-token continuation is scored as it
# stands, so these numbers compare settings with one another, not with the papers' tables.

# %%
by_reference = reference_quality(run.items, prompts)
plots.save_table(by_reference, "01_reference_quality")
display(by_reference[[c for c in by_reference.columns if c != "method"]].round(3))

# %%
shown = curve[curve.method != "hf"]
fig, axes = plots.new_figure(1, 2, figsize=(10, 3.8))
markers = {"CALM softmax": "o", "CALM softmax decaying": "v", "CALM state": "s", "CALM meta": "D", "FREE": "o",
           "FREE adaptive": "*", "FREE + rollback": "P"}
for variant, group in shown.groupby("variant", sort=False):
    group = group.sort_values("speedup_vs_full")
    colour = plots.colour(group.method.iloc[0])
    for ax, x in zip(axes, ("speedup_vs_full", "avg_layers"), strict=True):
        xerr = ([group.speedup_vs_full - group.speedup_vs_full_ci_low, group.speedup_vs_full_ci_high - group.speedup_vs_full]
                if x == "speedup_vs_full" else None)
        yerr = [group.rougeL_vs_full - group.rougeL_vs_full_ci_low, group.rougeL_vs_full_ci_high - group.rougeL_vs_full]
        ax.errorbar(group[x], group.rougeL_vs_full, xerr=xerr, yerr=yerr, color=colour, label=variant,
                    marker=markers.get(variant.split("@")[0], "^"), markersize=5, lw=0.8, capsize=2,
                    ls="-" if len(group) > 2 and variant in ("CALM softmax", "CALM state", "CALM meta", "FREE") else "none")
thresholded = shown[shown.threshold.notna()]
plots.label_points(axes[0], thresholded.speedup_vs_full, thresholded.rougeL_vs_full,
                   [f"{t:g}" for t in thresholded.threshold])  # each point's threshold, placed apart
axes[0].axvline(1.0, color="0.6", ls=":", lw=1)
axes[0].set_xlabel("paired speed ratio vs full depth (x), 95% CI over prompts")
axes[1].set_xlabel("average layers per generated token")
for ax in axes:
    ax.set_ylabel("ROUGE-L vs full-depth output (95% CI)")
    ax.set_ylim(-0.02, 1.02)
axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.suptitle("Early exit: speed and quality of every setting (left: labels are thresholds)")
plots.caption(fig, model=model_name, data=", ".join(prompt_data),
              extra=f"n = {len(prompts)} prompts, decoded to {curve.decoded_to.iloc[0]} (at most {max_new_tokens} "
                    f"tokens), batched; speed: {min(speed_prompts, len(prompts))} prompts x {rounds} rounds at batch 1, "
                    f"paired, greedy · {machine}")
plots.save_figure(fig, "01_speed_quality", table=curve)

# %% [markdown]
# Points to the right are faster than full-depth decoding on this machine, points near the top reproduce the
# full model (notebook 08 and `python -m effllm.bench early-exit` measure the engine against HF `generate`); lower
# thresholds move CALM and FREE
# to fewer layers and, where the exits are not yet reliable, lower ROUGE-L. The printout below names the
# fastest setting that keeps ROUGE-L >= 0.9 in this run.

# %%
good = curve[(curve.rougeL_vs_full >= 0.9) & (curve.method != "full") & curve.speedup_vs_full.notna()]
if len(good):
    best = good.sort_values("speedup_vs_full").iloc[-1]
    print(f"fastest setting with ROUGE-L >= 0.9: {best.label} at {best.speedup_vs_full:.2f}x full depth "
          f"(95% CI over {best.n_speed_prompts} prompts {best.speedup_vs_full_ci_low:.2f}-{best.speedup_vs_full_ci_high:.2f}), "
          f"{best.avg_layers:.1f} layers/token, "
          f"ROUGE-L {best.rougeL_vs_full:.3f} [{best.rougeL_vs_full_ci_low:.3f}, {best.rougeL_vs_full_ci_high:.3f}], "
          f"n = {best.n_prompts} prompts")
else:
    print("no timed setting reached ROUGE-L >= 0.9 in this run")

# %% [markdown]
# ### The same settings on the exit-trained model
#
# The papers' speed-ups come from models trained to exit. `trained_model` is this model with an exit trained at
# FREE's shallow layer by self-distillation (effllm.training, notebook 08; the backbone is untouched, so its
# full-depth output is the same). Static exit, CALM softmax and FREE (fixed and adaptive thresholds) decode the same
# prompts through the trained exit where it exists (the logit lens elsewhere); left the fitted exits of the curve
# above, right the trained exit, each against full-depth decoding in its own run.

# %%
if trained_model:
    ee, _ = models.load_model(trained_model, dtype=dtype, device=device)
    trained_layers = list(getattr(records.EXITS.get(ee), "layers", []))
    if not trained_layers:
        raise ValueError(f"{trained_model!r} carries no trained exit modules to compare")
    trained_at = max(layer for layer in trained_layers if layer < L)
    compared = {f"static@{trained_at}": StaticExit(trained_at)}
    compared |= {f"CALM softmax {t}": Calm("softmax", t, trained_at) for t in thresholds}
    compared |= {f"FREE {t}": Free(trained_at, t) for t in thresholds}
    compared["FREE adaptive"] = Free(trained_at, middle, use_adapt_threshold=True)
    trained_run = run_policies(ee, tokenizer, prompts, compared, max_new_tokens, rounds=rounds, hf=False,
                               speed_prompts=speed_prompts, timed=timed_settings)  # exit_transform None: the model's trained exits
    fitted_rows = curve[curve.label.isin(["hf_generate", "full", *(
        label for label in settings if label.startswith(("static", "CALM softmax", "FREE"))
        and "decaying" not in label and "rollback" not in label)])]
    side_by_side = pd.concat([fitted_rows.assign(exits="fitted exits (this model)"),
                              trained_run.summary.assign(exits=f"trained exit at layer {trained_at} ({trained_model})")],
                             ignore_index=True)
    display(side_by_side[["exits", "label", "speedup_vs_full", "speedup_vs_full_ci_low", "speedup_vs_full_ci_high", "avg_layers",
                          "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high", "identical_to_full",
                          "n_prompts"]].round(3))
    fig, axes = plots.new_figure(1, 2, figsize=(10, 3.8), sharex=True, sharey=True)  # one scale: the panels compare
    for ax, (exits, group) in zip(axes, side_by_side.groupby("exits", sort=False), strict=True):
        plots.speed_quality(ax, group, x="speedup_vs_full")
        ax.set(xlabel="paired speed ratio vs full depth (x), 95% CI over prompts", title=exits)
    axes[0].set(ylabel="ROUGE-L vs full-depth output (95% CI)", ylim=(-0.02, 1.05))
    axes[1].legend(fontsize=7)
    fig.suptitle("Untrained (fitted) exits and a trained exit, the same settings and prompts")
    plots.caption(fig, model=f"{model_name} | {trained_model}", data=", ".join(prompt_data),
                  extra=f"n = {len(prompts)} prompts, decoded to {curve.decoded_to.iloc[0]} (at most {max_new_tokens} "
                        f"tokens), batched; speed: {min(speed_prompts, len(prompts))} prompts x {rounds} rounds at "
                        f"batch 1, paired, greedy · {machine}")
    plots.save_figure(fig, "01_trained_vs_untrained", table=side_by_side)
    for exits, group in side_by_side.groupby("exits", sort=False):
        keeps = group[(group.rougeL_vs_full_ci_low >= 0.9) & ~group.method.isin(["hf", "full"])
                      & group.speedup_vs_full.notna()]
        best = keeps.loc[keeps.speedup_vs_full.idxmax()] if len(keeps) else None
        print(f"{exits}: fastest setting whose ROUGE-L interval stays above 0.9: " + (
            f"{best.label} at {best.speedup_vs_full:.2f}x full depth, {best.avg_layers:.1f} layers/token, ROUGE-L "
            f"{best.rougeL_vs_full:.3f} [{best.rougeL_vs_full_ci_low:.3f}, {best.rougeL_vs_full_ci_high:.3f}]"
            if best is not None else "none") + f" (n = {len(prompts)} prompts)")
    del ee

# %% [markdown]
# ## 3. Where tokens leave: exit-layer histograms
#
# The layer each generated token left from, for the static exits, CALM and FREE at the middle threshold of
# the curve (the first token of every prompt leaves from the prompt pass, at full depth or the static depth).

# %%
chosen = [label for label in settings if label.startswith("static")
          or label in (f"CALM softmax {middle}", f"FREE {middle}")]
histograms = exit_histogram({label: run.output(label) for label in chosen}, L)
fig, axes = plots.new_figure(1, len(chosen), sharey=True, figsize=(2.6 * len(chosen), 2.8), squeeze=False)
for ax, label in zip(axes[0], chosen, strict=True):
    group = histograms[histograms.setting == label]
    ax.bar(group.exit_layer, group.fraction, width=0.8, color=plots.colour(settings[label].method))
    ax.set_title(label, fontsize=8)
    plots.layer_axis(ax, label="exit layer (1-based)")
axes[0][0].set_ylabel("fraction of generated tokens")
fig.suptitle("Exit-layer histograms")
plots.caption(fig, model=model_name, data=", ".join(prompt_data),
              extra=f"n = {len(prompts)} prompts x {max_new_tokens} tokens")
plots.save_figure(fig, "01_exit_histograms", table=histograms)

# %%
summary = histograms.assign(weighted=histograms.exit_layer * histograms.fraction).groupby("setting", sort=False).agg(
    mean_exit_layer=("weighted", "sum"))
summary["at_full_depth"] = histograms[histograms.exit_layer == L].set_index("setting").fraction
display(summary.round(3))

# %% [markdown]
# CALM can exit at any layer from `exit_min_layer` on, FREE has only two possible exits (the shallow layer
# and L), and a static exit puts everything at one layer. The table gives the mean exit layer
# and the share of tokens that needed the full depth; those shares are what the speed in section 2 buys.

# %% [markdown]
# ## 4. Calibrating CALM's threshold with Learn-then-Test
#
# On separate calibration prompts, each candidate threshold's risk is the mean disagreement between its
# output and the full model's (`ltt_distance`: 1 - ROUGE-L, or the fraction of mismatched tokens). Candidates
# are tested from the safest down with a Hoeffding-Bentkus p-value; the lowest certified one guarantees
# risk <= delta with probability >= 1 - epsilon.

# %%
calm_base = Calm("softmax", 0.9, exit_min_layer)
with torch.inference_mode():
    ltt = calibrate_threshold(model, calibration_set, calibration_tokens, ltt_candidates, ltt_delta, ltt_epsilon,
                              calm_base, distance=ltt_distance, decode=tokenizer.decode, exit_transform=transform,
                              progress=False)  # decoded to the end of sequence, as the prompts it is checked on
display(ltt.table.round(4))
print(f"delta = {ltt_delta}, epsilon = {ltt_epsilon}, n = {ltt.n} prompts: chosen threshold {ltt.threshold}")
# what n would certify: even a zero risk needs (1 - delta)^n <= epsilon, and each candidate's risk needs more
print(f"calibration prompts that would certify: a zero risk {ltt_n_to_certify(0.0, ltt_delta, ltt_epsilon):.0f}; "
      + ", ".join(f"{r.candidate}: {r.n_to_certify:.0f}" for r in ltt.table.itertuples()))

fig, axes = plots.new_figure(1, 2, figsize=(9, 3.2))
axes[0].plot(ltt.table.candidate, ltt.table.risk, marker="o", color=plots.colour("calm"),
             label=f"empirical risk ({ltt_distance} distance)")
axes[0].axhline(ltt_delta, color="C3", lw=1, ls="--", label=f"delta = {ltt_delta} (allowed risk)")
axes[0].set_ylabel("mean disagreement with full depth")
axes[1].plot(ltt.table.candidate, ltt.table.p_value, marker="s", color="0.3", label="p-value of risk > delta")
axes[1].axhline(ltt_epsilon, color="C3", lw=1, ls="--", label=f"epsilon = {ltt_epsilon} (allowed error rate)")
axes[1].set_ylabel("Hoeffding-Bentkus p-value")
certified = ltt.table[ltt.table.certified]
axes[1].scatter(certified.candidate, certified.p_value, s=80, facecolors="none", edgecolors="C2", label="certified")
for ax in axes:
    ax.invert_xaxis()
    ax.set_xlabel("CALM threshold (tested from the left)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
fig.suptitle("Learn-then-Test calibration of CALM's threshold: risk against delta (left), p-value against epsilon (right)")
needed = ", ".join(f"{r.candidate}: {r.n_to_certify:.0f}" for r in ltt.table.itertuples())
plots.caption(fig, model=model_name, data=f"n = {ltt.n} calibration prompts, answers up to {calibration_tokens} "
              f"tokens; n that would certify each candidate's risk: {needed} (inf: risk >= delta)")
plots.save_figure(fig, "01_ltt_calibration", table=ltt.table)

# %% [markdown]
# A candidate is certified while its p-value stays below epsilon; the sequence stops at the first one that
# is not. With few calibration prompts even a zero empirical risk gives a p-value near (1 - delta)^n, so
# the guarantee needs enough prompts: below, the chosen threshold is checked on the held-out timed prompts.

# %%
if ltt.threshold is not None:
    certified_policy = Calm("softmax", ltt.threshold, exit_min_layer)
    full_outputs = run.output("full")
    with torch.inference_mode():
        # in batches, each row what decoding it alone gives, to its end of sequence (as the full-depth outputs)
        held_out = decode_rows(model, [p.input_ids for p in prompts], max_new_tokens, certified_policy,
                               exit_transform=transform)
    risks = [disagreement(o.new_tokens(0)[0], f.new_tokens(0)[0], ltt_distance, tokenizer.decode)
             for o, f in zip(held_out, full_outputs, strict=True)]
    layers_used = torch.cat([o.exit_layers[0] for o in held_out]).double().mean()
    print(f"held-out prompts at threshold {ltt.threshold}: mean {ltt_distance} risk {sum(risks) / len(risks):.3f} "
          f"(delta {ltt_delta}, n = {len(risks)}), {float(layers_used):.1f} layers/token")
else:
    print(f"no candidate certified at delta={ltt_delta}, epsilon={ltt_epsilon} with {ltt.n} prompts: "
          "raise delta or calibration_prompts")

# %% [markdown]
# ## 5. FREE's adaptive threshold
#
# FREE starts from `threshold` = 0.9 and, at every deep token, records the shallow
# confidence and whether the shallow argmax agreed with the deep one; a two-component Beta mixture fitted
# by moments sets the threshold to the lowest grid point where "agree" has posterior above 0.4. One
# estimator persists over a sequence of prompts.

# %%
estimator = AdaptiveThreshold(initial=0.9)
adaptive_policy = Free(shallow_exit_layer, 0.9, use_adapt_threshold=True, adapt_threshold=estimator)
with torch.inference_mode():
    for ids in adaptive_set:
        decode(model, ids, adaptive_tokens, adaptive_policy, exit_transform=transform)  # deep tokens up to the EOS
convergence = pd.DataFrame(estimator.history, columns=["sequence", "samples", "threshold"])
fig, ax = plots.new_figure()
ax.step(convergence.samples, convergence.threshold, where="post", color=plots.colour("free"))
for _, first in convergence.groupby("sequence").head(1).iterrows():
    ax.axvline(first.samples, color="0.85", lw=0.8, zorder=0)
ax.set_xlabel("recorded deep tokens (grey lines: a new prompt starts)")
ax.set_ylabel("FREE threshold")
ax.set_ylim(0.25, 0.95)
ax.set_title("FREE adaptive threshold: convergence over prompts\n" + plots.provenance(
    model=model_name, data=f"n = {len(adaptive_set)} prompts x {adaptive_tokens} tokens",
    extra=f"shallow exit {shallow_exit_layer}"))
plots.save_figure(fig, "01_adaptive_threshold", table=convergence)

# %%
if len(convergence):
    agree = sum(a for _, a in estimator.samples) / len(estimator.samples)
    print(f"{len(estimator.samples)} samples ({agree:.0%} agreeing); threshold 0.9 -> {estimator.threshold:.2f}; "
          f"last change at sample {int(convergence.samples[convergence.threshold.diff() != 0].iloc[-1])}")
else:
    print("no deep token recorded a shallow guess: the threshold stayed at 0.9")

# %% [markdown]
# The threshold stays at its start value until both classes have a few samples, then moves to where the
# two Beta components cross the posterior level; a flat tail means the estimate has settled for this model
# and these prompts (FREE freezes it after 300 sequences). Section 2's "FREE adaptive" row decoded the timed
# prompts with a fresh estimator, which starts learning on those prompts.

# %% [markdown]
# ## 6. One generation, coloured by exit layer
#
# CALM at the middle threshold on the first timed prompt: each generated token with the layer it left from
# (an interactive HTML render, and a static figure with the same numbers).

# %%
example = run.output(f"CALM softmax {middle}")[0]
coloured = token_exits(example, tokenizer)
page = plots.token_html(coloured.token.tolist(), coloured.exit_layer.tolist(), L,
                        f"CALM softmax, threshold {middle}, {model_name}", "exit layer")
plots.save_html(page, "01_generation_by_exit_layer")
display(HTML(page))

fig, ax = plots.new_figure(figsize=(max(4.5, 0.16 * len(coloured)), 3.0))
colormap = mpl.colormaps["viridis"]
ax.bar(coloured.position, coloured.exit_layer, color=[colormap((v - 1) / max(L - 1, 1)) for v in coloured.exit_layer])
ax.set_xticks(coloured.position, [t.replace("\n", "\\n") for t in coloured.token], rotation=90, fontsize=6)
plots.layer_axis(ax, axis="y", label="exit layer (1-based)")
ax.set_ylim(0, L + 0.5)
ax.set_title(f"One CALM generation (threshold {middle}) coloured by exit layer\n"
             + plots.provenance(model=model_name, data=f"{prompt_data[0]} prompt 0"))
plots.save_figure(fig, "01_generation_by_exit_layer", table=coloured)

# %% [markdown]
# Read which tokens leave early and which need the full depth: candidates for early exits are tokens that
# continue an evident pattern (the rest of a word or an identifier, closing punctuation). Hover over the
# HTML render to read each token's layer; the bar chart carries the same numbers.

# %% [markdown]
# ## 7. FREE with and without rollback
#
# After each synchronized pass the deep layers see every stacked shallow token; with rollback, the first
# stacked token whose deep cross-entropy exceeds `rollback_threshold` nats is replaced by the deep argmax
# and decoding resumes from there. Same prompts and threshold, from the runs of section 2.

# %%
rollback_labels = [f"FREE {rollback_at}", f"FREE {rollback_at} + rollback"]
rollback = curve.set_index("label").loc[rollback_labels, ["threshold", "speedup_vs_full", "speedup_vs_full_ci_low",
                                                          "speedup_vs_full_ci_high", "avg_layers", "rougeL_vs_full",
                                                          "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high",
                                                          "rollbacks", "n_prompts"]].reset_index()
display(rollback.round(3))
fig, axes = plots.new_figure(1, 3, figsize=(9, 2.8))
# the cost panel: layers per generated token (a revision decodes the tokens after it again), which every prompt
# measures; the paired speed of these two settings exists only where `timed_settings` names them
panels = [("avg_layers", "layers per generated token", None),
          ("rougeL_vs_full", "ROUGE-L vs full depth", ("rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high")),
          ("rollbacks", "tokens revised (all prompts)", None)]
for ax, (column, title, bounds) in zip(axes, panels, strict=True):
    yerr = None if bounds is None else [rollback[column] - rollback[bounds[0]], rollback[bounds[1]] - rollback[column]]
    ax.bar(["off", "on"], rollback[column], yerr=yerr, capsize=3, color=[plots.colour("free"), "#7f3c8d"])
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("rollback")
fig.suptitle(f"FREE at threshold {rollback_at}: rollback off / on ({rollback_threshold} nats)")
plots.caption(fig, model=model_name, data=", ".join(prompt_data),
              extra=f"n = {len(prompts)} prompts, decoded to {curve.decoded_to.iloc[0]} (at most {max_new_tokens} "
                    f"tokens), batched · {machine}")
plots.save_figure(fig, "01_rollback", table=rollback)

# %%
off, on = rollback.iloc[0], rollback.iloc[1]
print(f"rollback revised {int(on.rollbacks)} tokens: ROUGE-L {off.rougeL_vs_full:.3f} -> {on.rougeL_vs_full:.3f}, "
      f"layers per token {off.avg_layers:.2f} -> {on.avg_layers:.2f}"
      + (f", speed {off.speedup_vs_full:.2f}x -> {on.speedup_vs_full:.2f}x full depth"
         if pd.notna(off.speedup_vs_full) and pd.notna(on.speedup_vs_full) else "")
      + f" (n = {int(on.n_prompts)} prompts)")

# %% [markdown]
# Rollback trades speed for quality: every revision discards the tokens after it and decodes them again,
# so it pays off where the shallow exit is often wrong (low thresholds) and costs little where it is not.
