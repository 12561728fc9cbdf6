"""The one switch for the default precision, readable without importing torch (run_all.py's parser uses it).

``EFFLLM_DTYPE=float32 | bfloat16 | auto``: ``auto`` (or unset) is the hardware rule of
:func:`effllm.models.default_dtype` (bfloat16 where the CPU or GPU computes in it natively, float32 elsewhere);
a named precision is the default of every model :func:`effllm.models.load_model` loads without a ``dtype``.
``run_all.py --dtype`` sets it for every notebook kernel; ``make test`` sets it to take the path the machine
would not take by default.
"""

DTYPE_ENV = "EFFLLM_DTYPE"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def other_dtype() -> str:
    """The precision this machine would *not* pick under ``auto``: what ``make test`` runs its second pass in."""
    from effllm.models import cpu_supports_bfloat16

    return "float32" if cpu_supports_bfloat16() else "bfloat16"


if __name__ == "__main__":  # python -m effllm.precision --other (the Makefile's second test pass)
    import sys

    if sys.argv[1:] != ["--other"]:
        sys.exit(f"usage: python -m effllm.precision --other (prints {' or '.join(DTYPE_CHOICES[1:])}); "
                 f"got {' '.join(sys.argv[1:]) or 'no argument'}")
    print(other_dtype())
