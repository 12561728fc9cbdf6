"""effllm: one model, one API, five efficient-LLM papers.

The methods:
    models      loading (embedded models from PyPI wheels, hub ids, folders, exit-trained '-ee' models through a
                registry of model sources), tiny models, the default precision
    adapters    the architecture adapter: the one way methods reach layers, projections, norms, head (one
                module per family: llama, opt, gpt2, t5)
    decoding    one decoding core with a policy object per method: full, static exit, CALM, FREE, layer
                skipping, self-speculation (effllm.exits.generate: the same with the seeds' keyword names)
    training    training a model to exit early (the seeds' losses, exit modules, self-distillation)
    lens        the logit lens, fitted (least-squares) exits, CALM's meta classifier
    vocab       vocabulary-pruning analyses of the exit confidence
    controllers learned per-token skip controllers;  oracle: the per-sequence knapsack oracle
    ltt         Learn-then-Test threshold calibration
    pruning     magnitude, Wanda, SparseGPT (unstructured and N:M), masks;  domains: domain sub-models
    slicing     layer redundancy, block influence, SliceGPT with dynamic slice fractions, ShortGPT
    sparse      2:4 semi-structured and CSR sparse linears;  frontier: parameters, FLOPs, Pareto fronts
    capture     the layer-by-layer calibration loop shared by pruning, slicing and layer scores

What they share:
    data, metrics, zeroshot, plots, checks, io, paths, execution (confined model-written code), standins
    records     the notes effllm keeps on a model (trained exits, slicing / pruning settings, ...): typed get / set
    precision   the EFFLLM_DTYPE switch (auto | float32 | bfloat16) that load_model, run_all.py and the bench honour,
                and the CPU facts behind it (native bfloat16, ISA, model name)

Around them:
    experiments the experiments notebooks and benchmarks share (prompts, runs, evaluation, claims, README)
    bench       benchmarks that print a table and write JSON under results/ (python -m effllm.bench)
    runner      what run_all.py runs: notebooks headless, profiles, sweeps, reports

This package imports none of its modules: ``import effllm.precision`` (run_all.py's parser) stays free of torch,
and ``import effllm.models`` of training code (the ``-ee`` source is imported when such a name is loaded).
"""

__version__ = "0.1.0"
