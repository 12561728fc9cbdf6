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
# # 05 · Sparse inference speed: what 2:4 pruning buys
#
# Wanda and SparseGPT (notebook 04) can prune a model to the **2:4 semi-structured** pattern: in every
# group of four consecutive input weights of a row, two are zero. NVIDIA's sparse tensor cores (Ampere and
# newer, compute capability >= 8.0) execute that pattern at up to twice the dense math rate, and torch
# exposes them through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt or CUTLASS; torchao's
# `sparsify_` wraps the same kernels). The seed paper (domain-specific sub-models by Wanda pruning) measured
# the speedup of 2:4 over dense per projection of CodeLlama-13B: 1.36x for q/k/v/o, 1.01x for up/gate,
# 1.20x for down. This notebook measures that table on the machine it runs on: dense against sparse matmuls
# per projection type (q, k, v, o, gate, up, down) at the embedded model's shapes and at CodeLlama-13B's
# (random weights of the right shapes), for 1, 16 and 2048 tokens, and end to end (prefill and decoding) for
# a pruned model. On a GPU with 2:4 kernels it measures them; **on a CPU no 2:4 kernel exists**, so it says
# so and measures what a CPU has: torch sparse CSR against dense at the same 50% sparsity.

# %%
import copy

import pandas as pd
import torch
from IPython.display import display

from effllm import plots, sparse
from effllm.adapters import get_adapter
from effllm.experiments import sparse_speed, timing
from effllm.experiments.session import open_session
from effllm.pruning import prune

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda; the paper profile asks for cuda
# None: what the kernels take, float16 on a GPU (2:4) and float32 on a CPU (torch's CSR matmul has no bfloat16 on a
# CPU, so EFFLLM_DTYPE does not apply here)
dtype = None
shape_sets = ["model", "codellama-13b"]  # "model": model_name's shapes; or names in effllm.sparse.SHAPE_SETS
token_counts = {"model": [1, 16, 2048], "codellama-13b": [1, 16]}  # tokens per matmul, per shape set
threads = 1  # intra-op threads while timing (None: torch's default; 1 is steadier on a shared CPU)
min_run_time = 0.1  # seconds per torch.utils.benchmark measurement
rounds = 5  # dense and sparse are timed alternately this many times: the median ratio and its spread are reported
prompt_corpus = "python-code"  # built-in corpus of the end-to-end prompt
prompt_tokens = 128  # prefill length
decode_tokens = 16  # greedy tokens decoded with the KV cache

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
target = sparse.resolve_device(device)
env = sparse.environment(target)
fmt, dtype = env["format"], dtype or sparse.default_dtype(target)
model, tokenizer, target, machine = open_session(model_name, target, dtype, profile=profile)  # this notebook's own precision rule
adapter = get_adapter(model)
display(pd.Series({k: v for k, v in env.items() if k != "note"}, name="this machine").to_frame())
print(env["note"])

# %% [markdown]
# ## What the machine can run
#
# `effllm.sparse.environment` asks torch what exists here: a CUDA device of compute capability >= 8.0 for
# the 2:4 kernels (and whether torch was built with cuSPARSELt or falls back to CUTLASS), or else sparse CSR.
# Every table and figure below names the device and the format that was actually measured.

# %% [markdown]
# ## Step 1: prune to 2:4 and check the pattern
#
# Magnitude pruning with the 2:4 pattern (the mask choice does not change the speed: only where the zeros
# are allowed to be matters). `sparse.check_2_4` verifies every linear; the kernels' compression would
# otherwise silently drop the extra non-zeros of a weight that is not 2:4. The check on the unpruned weight
# shows what its error looks like.

# %%
pruned_2_4 = copy.deepcopy(model)
prune(pruned_2_4, "magnitude", None, pattern="2:4", progress=False)
pruned_adapter = get_adapter(pruned_2_4)
pattern_rows = []
for i in range(pruned_adapter.num_layers):
    for kind, module in {**pruned_adapter.attention_projections(i), **pruned_adapter.mlp_projections(i)}.items():
        weight = pruned_adapter.weight(module)
        pattern_rows.append({"layer": i, "kind": kind, "zeros": float((weight == 0).float().mean()),
                             "valid_2_4": sparse.is_2_4(weight)})
pattern_check = pd.DataFrame(pattern_rows)
display(pattern_check.groupby("kind", sort=False).agg(linears=("layer", "size"), zeros=("zeros", "mean"),
                                                      all_valid_2_4=("valid_2_4", "all")))
try:
    sparse.check_2_4(adapter.weight(adapter.attention_projections(0)["q"]), "layer 0 q (unpruned)")
except sparse.SparsePatternError as error:
    print(f"SparsePatternError: {error}")

# %%
q_pruned = pruned_adapter.weight(pruned_adapter.attention_projections(0)["q"])
patch = (q_pruned[:16, :32] != 0).float().cpu()
fig, ax = plots.new_figure(figsize=(6, 3.4))
ax.imshow(patch.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="equal")
for column in range(4, 32, 4):
    ax.axvline(column - 0.5, color="tab:red", linewidth=0.6)
ax.set_xlabel("input column (red lines: groups of 4)")
ax.set_ylabel("output row")
ax.grid(False)
ax.set_title("2:4 pattern: kept weights (black) of layer 0's q projection, first 16 x 32\n"
             + plots.provenance(model=model_name, extra="magnitude pruning, 2:4"))
patch_table = pd.DataFrame([{"row": r, "column": c, "kept": bool(patch[r, c])}
                            for r in range(patch.shape[0]) for c in range(patch.shape[1])])
plots.save_figure(fig, "05_2_4_pattern", table=patch_table)

# %%
share_valid = pattern_check.valid_2_4.mean()
print(f"{share_valid:.0%} of {len(pattern_check)} linears pass the 2:4 check; "
      f"{pattern_check.zeros.mean():.1%} of their weights are zero.")

# %% [markdown]
# Every block of four input columns (between two red lines) keeps exactly two weights in each row: that is
# the only structure the sparse tensor cores need, and the reason 2:4 pruning costs more quality than 50%
# unstructured pruning (notebook 04). The printed line computes the share of linears that pass the check.

# %% [markdown]
# ## Step 2: dense against sparse, per projection
#
# For each projection type and token count: a random weight of that shape, pruned with the format's pattern
# (2:4 for the semi-structured kernels; 50% unstructured for CSR), multiplied by random activations
# [tokens, in], timed with `torch.utils.benchmark.Timer`, dense and sparse alternately in `rounds` rounds.
# `speedup` = dense time / sparse time within one round; the bars are the median over rounds, the whiskers
# its range and the dots the single rounds. Above 1 the sparse kernel is faster. The CodeLlama-13B rows use
# the seed's shapes (hidden 5120, intermediate 13824, 40 heads), so they are comparable with its table.

# %%
labels = {"model": model_name, "codellama-13b": "CodeLlama-13B (shapes)"}
tables = []
for shape_name in shape_sets:
    shapes = sparse.shape_set(shape_name, model)
    table = sparse_speed.projection_timings(shapes, token_counts[shape_name], fmt, target, dtype, min_run_time,
                                            rounds, seed, threads=threads)
    table.insert(0, "shapes", labels.get(shape_name, shape_name))
    tables.append(table)
timings = pd.concat(tables, ignore_index=True)
timings["device"] = env["device"]
per_round = sparse_speed.projection_rounds(timings)
plots.save_table(per_round, "05_projection_rounds")
print(f"Measured on {env['device']}: dense vs {fmt} ({env['pattern']}, {env['dtype']}), {rounds} interleaved rounds")
display(timings.drop(columns=["dense_rounds_ms", "sparse_rounds_ms"]).round(3))

# %%
format_label = {"csr": "sparse CSR", "semi-structured": "2:4 semi-structured"}[fmt]
panels = list(dict.fromkeys(timings.shapes))
fig, axes = plots.new_figure(1, len(panels), squeeze=False, sharey=True, figsize=(4.8 * len(panels), 3.8))
for ax, panel in zip(axes[0], panels, strict=True):
    part = timings[timings.shapes == panel]
    kinds = list(dict.fromkeys(part.kind))
    counts = sorted(set(part.tokens))
    width = 0.8 / len(counts)
    for j, tokens in enumerate(counts):
        rows = part[part.tokens == tokens].set_index("kind").reindex(kinds)
        x = [k + (j - (len(counts) - 1) / 2) * width for k in range(len(kinds))]
        colour = f"C{j}"
        ax.bar(x, rows.speedup, width, color=colour, alpha=0.75, label=f"{tokens} token{'s' if tokens > 1 else ''}")
        ax.errorbar(x, rows.speedup, yerr=[rows.speedup - rows.speedup_min, rows.speedup_max - rows.speedup],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        dots = per_round[(per_round.shapes == panel) & (per_round.tokens == tokens)]
        ax.scatter([x[kinds.index(k)] for k in dots.kind], dots.speedup, s=4, color="black", zorder=3)
    if fmt == "semi-structured" and panel.startswith("CodeLlama"):  # the seed's numbers are 2:4 on a GPU too
        ax.scatter(range(len(kinds)), [sparse.SEED_SPEEDUPS.get(k) for k in kinds], marker="_", s=300,
                   color=plots.colour("wanda"), zorder=4, label="seed (2:4, GPU)")
    ax.axhline(1.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_xlabel("projection")
    ax.set_title(panel)
axes[0][0].set_ylabel(f"speedup (dense time / {format_label} time)")
legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=len(legend))
fig.suptitle(f"Dense vs {format_label} matmul per projection (50% {env['pattern']}, {env['dtype']}): median of "
             f"{rounds} interleaved rounds, whiskers min-max, dots single rounds\n"
             + plots.provenance(extra=f"device: {env['device']}, {threads or torch.get_num_threads()} thread(s)"),
             fontsize="small")
plots.save_figure(fig, "05_projection_speedup", table=timings.drop(columns=["dense_rounds_ms", "sparse_rounds_ms"]))

# %%
by_tokens = timings.groupby("tokens").speedup.median()
faster = (timings.speedup_min > 1).mean()
slower = (timings.speedup_max < 1).mean()
print(f"Median speedup by token count: {by_tokens.round(2).to_dict()}; in every one of {rounds} rounds the sparse "
      f"format was faster in {faster:.0%} and slower in {slower:.0%} of the {len(timings)} measurements "
      f"({fmt} on {env['device']}).")

# %% [markdown]
# ### The seed's numbers beside what was measured here
#
# The seed measured 2:4 semi-structured kernels on a GPU at CodeLlama-13B's shapes. The table puts its speedups
# beside this run's at the same shapes (the largest token count measured), with the format and device that were
# actually measured: on a CPU that is CSR, a different kernel on different hardware, so the two columns are not
# the same experiment and are not drawn on one axis.

# %%
codellama = timings[timings.shapes.str.startswith("CodeLlama")]
seed_rows = []
for kind, speedup in sparse.SEED_SPEEDUPS.items():
    here = codellama[codellama.kind == kind].sort_values("tokens").tail(1)
    row = {"projection": kind, "seed speedup (2:4, GPU)": speedup}
    if not here.empty:
        here = here.iloc[0]
        row.update({"measured speedup (median)": round(float(here.speedup), 3),
                    "measured min-max": f"{here.speedup_min:.3f}-{here.speedup_max:.3f}", "rounds": int(here.rounds),
                    "tokens": int(here.tokens), "format measured": here["format"], "device": here.device})
    seed_rows.append(row)
seed_table = pd.DataFrame(seed_rows)
plots.save_table(seed_table, "05_seed_speedups")
display(seed_table)

# %% [markdown]
# Bars above the dashed line are projections where the sparse format beat dense on this machine in the median
# round; a whisker that crosses the line means the rounds disagree. With 2:4 kernels, look for the speedup to
# grow with the size of the matmul (more tokens, bigger shapes) toward the hardware's 2x; a single token is
# memory-bound, so what can help there is the smaller weight. CSR stores a column index next to every kept weight
# and cannot use the blocked dense BLAS kernels, so at 50% sparsity expect it to lose to dense; the printed line
# gives the medians this run measured and in how many measurements every round agreed.

# %% [markdown]
# ## Step 3: end to end, prefill and decode
#
# The model pruned with the measured format's pattern, converted with `sparse.sparsify_model` (every
# attention and MLP projection; the embeddings and LM head stay dense), against the same pruned model in
# dense storage (which runs exactly as fast as the unpruned model). First the outputs are compared, then the
# prefill of a prompt from the built-in corpus and greedy decoding with the KV cache are timed.

# %%
pattern, sparsity = sparse.default_pattern(fmt)
if pattern == "2:4":
    pruned = pruned_2_4
else:
    del pruned_2_4
    pruned = model
    prune(pruned, "magnitude", sparsity, pattern=pattern, progress=False)
sparse_model, conversion = sparse.sparse_copy(pruned, fmt)
display(conversion.groupby(["kind", "format"], sort=False).size().rename("linears").to_frame())
prompt = sparse_speed.benchmark_prompt(tokenizer, prompt_tokens, prompt_corpus).to(target)
with timing.num_threads(threads):
    agreement = sparse_speed.output_agreement(pruned, sparse_model, prompt, decode_tokens)
display(pd.Series(agreement, name=f"{fmt} vs dense storage").to_frame())
end_to_end = sparse_speed.end_to_end_timings(pruned, sparse_model, prompt, decode_tokens, min_run_time, rounds,
                                       threads=threads)
end_to_end.insert(0, "model", model_name)
end_to_end["format"], end_to_end["device"] = fmt, env["device"]
display(end_to_end)

# %%
fig, axes = plots.new_figure(1, 2, squeeze=False)
for ax, (_, row) in zip(axes[0], end_to_end.iterrows(), strict=True):
    medians = [row.dense_ms, row.sparse_ms]
    lows = [min(row.dense_rounds_ms), min(row.sparse_rounds_ms)]
    highs = [max(row.dense_rounds_ms), max(row.sparse_rounds_ms)]
    ax.bar(["dense", format_label], medians, color=[plots.colour("dense"), plots.colour("magnitude")], alpha=0.8)
    ax.errorbar([0, 1], medians, yerr=[[m - lo for m, lo in zip(medians, lows, strict=True)],
                                       [hi - m for m, hi in zip(medians, highs, strict=True)]],
                fmt="none", ecolor="black", capsize=3)
    for x, times in ((0, row.dense_rounds_ms), (1, row.sparse_rounds_ms)):
        ax.scatter([x] * len(times), times, s=6, color="black", zorder=3)
    unit = f"ms per {row.tokens}-token prefill" if row.phase == "prefill" else "ms per decoded token"
    ax.set_ylabel(unit)
    ax.set_title(f"{row.phase}: speedup {row.speedup:.2f}x (rounds: {row.speedup_min:.2f}-{row.speedup_max:.2f})")
fig.suptitle(f"End to end: {model_name}, 50% {pattern} magnitude-pruned, dense vs {format_label}; median of "
             f"{rounds} interleaved rounds, whiskers min-max, dots single rounds\n"
             + plots.provenance(data=f"{prompt_corpus}, {prompt_tokens}-token prompt, {decode_tokens} decoded",
                                extra=f"device: {env['device']}"), fontsize="small")
plots.save_figure(fig, "05_end_to_end", table=end_to_end.drop(columns=["dense_rounds_ms", "sparse_rounds_ms"]))

# %%
for _, row in end_to_end.iterrows():
    verdict = "faster" if row.speedup_min > 1 else "slower" if row.speedup_max < 1 else "not resolved (rounds disagree)"
    print(f"{row.phase}: {fmt} is {verdict} than dense (median {row.speedup:.2f}x, rounds {row.speedup_min:.2f}-"
          f"{row.speedup_max:.2f}, n = {int(row.rounds)}; {row.sparse_tokens_per_s:.1f} vs {row.dense_tokens_per_s:.1f} "
          "tokens/s)")
print(f"greedy tokens identical to the dense model's: {agreement['greedy_token_agreement']:.0%}")

# %% [markdown]
# The sparse model computes the same function as the pruned dense one (the logit difference is rounding,
# and the greedy tokens agree), so any gain here is pure speed. End to end, only the projections are
# sparse: attention over the cache, the norms and the LM head run as before, which caps what sparsity can
# buy even where the per-projection speedups of step 2 are above 1. The printed lines state, for this run,
# whether prefill and decoding got faster or slower.
