"""effllm: one model, one API, five efficient-LLM papers.

Modules: ``models`` (loading, tiny test models, architecture adapters), ``data`` (built-in corpora and
tasks, calibration sets), ``metrics`` (perplexity, ROUGE, pass@k), ``plots`` (figure style and export),
``lens`` (per-layer predictions).
"""

__version__ = "0.1.0"
