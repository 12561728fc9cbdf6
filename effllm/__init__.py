"""effllm: one model, one API, five efficient-LLM papers.

Modules:
    models    loading (embedded models from PyPI wheels, hub ids, folders), tiny test models
    adapters  the architecture adapter: the one way methods reach layers, projections, norms, head
    data      built-in corpora and tasks, calibration windows, hub data sets for the paper profile
    metrics   perplexity, ROUGE, HumanEval pass@k
    plots     the figure style and atomic figure export
    capture   the layer-by-layer calibration loop shared by pruning, slicing and layer scores
    lens      the logit lens and fitted (least-squares) exits
    exits     greedy decoding with early exit: full, static, CALM, FREE
    pruning   magnitude, Wanda, SparseGPT (unstructured and N:M)
    slicing   layer redundancy, block influence, SliceGPT with dynamic slice fractions, ShortGPT
    bench     benchmarks that print a table and write JSON under results/
"""

__version__ = "0.1.0"
