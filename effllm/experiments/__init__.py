"""The experiment layer: what the notebooks and the benchmark CLI (``python -m effllm.bench``) both run, on top
of the methods in :mod:`effllm`. Nothing is imported here; import the module you need.

    session.py         open_session: a notebook's model, tokenizer, device and machine line in one call
    prompts.py         task_prompts: prompts with references for every experiment
    runs.py            run_policies: decoding policies x prompts -> one tidy table (speed and quality)
    timing.py          time_rounds (the one interleaved timing loop), thread control, bounds, profiles
    stats.py           bootstrap intervals of means and paired differences, ratio spreads over rounds
    evaluate.py        task quality: HumanEval and MBPP pass@1, arithmetic, translation, sub-model evaluation
    frontier.py        FrontierTable: every method on one model, measured the same way (notebook 07)
    compression.py     pruning time, memory and quality against one forward pass
    sparse_speed.py    dense against sparse matmuls and end-to-end decoding (seed 002's 2:4 claim)
    analyses.py        teacher-forced analyses behind the notebooks' figures
    masks.py           pruning-mask analysis (seed 002: overlap of the domains' masks)
    slicing_compare.py slicing methods compared on one model
    claims.py          the claims report (claims.csv, the README block); claims_by_seed.py (seeds 000, 001, 003)
                       and claims_compression.py (002, 004) hold the claims, verdicts.py the Claim record
    readme.py          the README's generated tables of measured numbers
"""
