"""The one switch for the default precision and the CPU facts it rests on, readable without importing torch
(run_all.py's parser uses it; only :func:`cpu_supports_bfloat16` imports torch, when it is called).

``EFFLLM_DTYPE=float32 | bfloat16 | auto``: ``auto`` (or unset) is the hardware rule of
:func:`effllm.models.default_dtype` (bfloat16 where the CPU or GPU computes in it natively, float32 elsewhere);
a named precision is the default of every model :func:`effllm.models.load_model` loads without a ``dtype``.
``run_all.py --dtype`` sets it for every notebook kernel; ``make test`` sets it to take the path the machine
would not take by default.
"""

from __future__ import annotations

import platform

DTYPE_ENV = "EFFLLM_DTYPE"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")

# /proc/cpuinfo flags of x86 CPUs with bfloat16 arithmetic (AVX-512 BF16 dot products, AMX tiles).
# Without them bfloat16 is emulated: one SmolLM2 forward pass over 4 x 128 tokens under bfloat16 autocast took
# 36.9 s against 18.4 s in float32 on a busy AVX2-only 2-core VM; on an AVX-512 BF16 CPU, HF generate
# ran 1.9x faster in bfloat16 than in float32 (shared/DESIGN.md).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_supports_bfloat16() -> bool:
    """True when this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), so bfloat16 is faster than
    float32 rather than emulated. PyTorch's capability string names AVX-512 but not its BF16 extension,
    hence the flags; an AMX capability (newer PyTorch) counts too."""
    import torch  # here, not at the top: the rest of this module must import without torch

    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AMX" in capability or any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def cpu_isa(flags: set[str], native_bfloat16: bool) -> str:
    """The widest vector instruction set of a CPU with ``flags``, as run summaries name it ("AVX-512 BF16",
    "AVX-512", "AVX2", else the machine's architecture)."""
    if native_bfloat16:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else platform.machine() or "unknown"


def other_dtype() -> str:
    """The precision this machine would *not* pick under ``auto``: what ``make test`` runs its second pass in."""
    return "float32" if cpu_supports_bfloat16() else "bfloat16"


if __name__ == "__main__":  # python -m effllm.precision --other (the Makefile's second test pass)
    import sys

    if sys.argv[1:] != ["--other"]:
        sys.exit(f"usage: python -m effllm.precision --other (prints {' or '.join(DTYPE_CHOICES[1:])}); "
                 f"got {' '.join(sys.argv[1:]) or 'no argument'}")
    print(other_dtype())
