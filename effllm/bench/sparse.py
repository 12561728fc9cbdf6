"""Sparse inference speed: dense against 2:4 semi-structured (CUDA) or sparse CSR (CPU) matmuls per
projection, and end to end (prefill, decode) for a pruned model.

    python -m effllm.bench sparse [--model smollm2-135m] [--shapes model|codellama-13b] [--tokens 1,16,2048]
                                  [--threads N] [--out results/sparse_smollm2-135m_model_cpu.json]

Per projection (q/k/v/o/gate/up/down) and token count: random weights of the shape set's shapes, pruned by
magnitude (2:4 on a GPU with 2:4 kernels, 50% unstructured otherwise), timed dense and sparse with
torch.utils.benchmark.Timer, alternately, the fastest of ``--rounds`` medians kept. ``--shapes model`` takes
the shapes of ``--model``'s first decoder layer, ``codellama-13b`` those of the seed's CodeLlama-13B (hidden
5120, intermediate 13824, 40 heads; no download). End to end: ``--model`` pruned the same way (magnitude;
speed does not depend on which weights are zero), converted to the sparse format, against the same pruned
model in dense storage: prefill of ``--prompt-tokens`` tokens and greedy decoding of ``--decode-tokens``.

On a CPU no 2:4 kernel exists: the output and the JSON say so, and what is measured there is dense against
torch sparse CSR. The CodeLlama-13B shapes at 2048 tokens take minutes per projection on a small CPU: pass
fewer ``--tokens`` there (for example ``--tokens 1,16,128``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from effllm import sparse
from effllm.bench import print_table, write_result
from effllm.experiments import sparse_speed, timing
from effllm.models import load_model
from effllm.pruning import prune

NAME = "sparse"
HELP = "dense vs 2:4 semi-structured (GPU) or CSR (CPU) matmuls per projection, and end to end"

PROJECTION_COLUMNS = ["kind", "out_features", "in_features", "tokens", "format", "dense_ms", "sparse_ms",
                      "speedup", "max_abs_error"]
END_TO_END_COLUMNS = ["phase", "tokens", "dense_ms", "sparse_ms", "speedup", "dense_tokens_per_s",
                      "sparse_tokens_per_s"]
PROMPT_CORPUS = "python-code"


def _token_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"--tokens must be comma-separated positive integers such as 1,16,2048; got {text!r}")
    return counts


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model for --shapes model and end to end")
    parser.add_argument("--shapes", default="model", choices=["model", *sparse.SHAPE_SETS],
                        help="projection shapes: the model's, or the seed's CodeLlama-13B (random weights)")
    parser.add_argument("--tokens", default=",".join(map(str, sparse.TOKEN_COUNTS)),
                        help="token counts per matmul, comma-separated (default 1,16,2048)")
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu or cuda[:N]")
    parser.add_argument("--format", default="auto", choices=["auto", *sparse.FORMATS],
                        help="auto: semi-structured where 2:4 kernels exist, else csr")
    parser.add_argument("--backend", default="torch", choices=list(sparse.BACKENDS),
                        help="semi-structured conversion of the model: torch or torchao's sparsify_")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads while measuring (default: torch's; 1 is steadier on a busy CPU)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per Timer measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating dense/sparse rounds; fastest kept")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--no-end-to-end", action="store_true", help="per-projection matmuls only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)


def run(args) -> int:
    try:
        token_counts = _token_list(args.tokens)
        device = sparse.resolve_device(args.device)
    except (ValueError, sparse.SparseFormatUnavailableError) as error:
        args._parser.error(str(error))
    if args.threads is not None and args.threads < 1:
        args._parser.error(f"--threads must be >= 1; got {args.threads}")
    if args.min_run_time <= 0 or args.rounds < 1 or args.prompt_tokens < 1 or args.decode_tokens < 2:
        args._parser.error(
            "--min-run-time must be > 0, --rounds and --prompt-tokens >= 1, --decode-tokens >= 2; got "
            f"{args.min_run_time}, {args.rounds}, {args.prompt_tokens}, {args.decode_tokens}")
    env = sparse.environment(device)
    fmt = env["format"] if args.format == "auto" else args.format
    if fmt == "semi-structured" and not env["semi_structured_available"]:
        args._parser.error(f"--format semi-structured is not available here: {env['semi_structured_reason']}. "
                           "Use --format csr or auto.")
    pattern, sparsity = sparse.default_pattern(fmt)
    dtype = sparse.default_dtype(device)
    print(f"device: {env['device']}, torch {env['torch']}")
    if not env["semi_structured_available"]:
        print(f"NOTE: {env['note']}")
    print(f"measuring dense vs {fmt} ({pattern}, {dtype}) with "
          f"{args.threads or torch.get_num_threads()} thread(s)")

    torch.manual_seed(args.seed)
    with timing.num_threads(args.threads) as threads:
        model = tokenizer = None
        if args.shapes == "model" or not args.no_end_to_end:
            model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        shapes = sparse.shape_set(args.shapes, model)
        projections = sparse_speed.projection_timings(shapes, token_counts, fmt, device, dtype, args.min_run_time,
                                                args.rounds, args.seed)
        end_to_end = agreement = conversion = None
        if not args.no_end_to_end:
            prune(model, "magnitude", None if pattern != "unstructured" else sparsity, pattern=pattern,
                  progress=False)
            sparse_model, report = sparse.sparse_copy(model, fmt, args.backend)
            conversion = report.format.value_counts().to_dict()
            prompt = sparse_speed.benchmark_prompt(tokenizer, args.prompt_tokens, PROMPT_CORPUS).to(device)
            agreement = sparse_speed.output_agreement(model, sparse_model, prompt, args.decode_tokens)
            end_to_end = sparse_speed.end_to_end_timings(model, sparse_model, prompt, args.decode_tokens,
                                                   args.min_run_time, args.rounds)

    projection_rows = projections.to_dict(orient="records")
    print(f"\nper projection ({args.shapes} shapes): dense vs {fmt}")
    print_table(projection_rows, PROJECTION_COLUMNS, width=12)
    result = {
        "benchmark": NAME, "device": env["device"], "device_type": device.type, "torch": env["torch"],
        "semi_structured_available": env["semi_structured_available"],
        "semi_structured_reason": env["semi_structured_reason"],
        "note": env["note"],
        "format": fmt, "pattern": pattern, "sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""),
        "threads": threads, "min_run_time": args.min_run_time, "rounds": args.rounds, "seed": args.seed,
        "shapes": args.shapes, "token_counts": token_counts, "projections": projection_rows,
        "model": args.model if model is not None else None, "end_to_end": None,
    }
    if end_to_end is not None:
        rows = end_to_end.to_dict(orient="records")
        print(f"\nend to end ({args.model}, {pattern} magnitude-pruned, prompt from {PROMPT_CORPUS}): dense vs {fmt}")
        print_table(rows, END_TO_END_COLUMNS, width=12)
        print(f"sparse vs dense outputs: {agreement}")
        result["end_to_end"] = {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                                "prompt_corpus": PROMPT_CORPUS, "backend": args.backend,
                                "layers_by_format": conversion, "agreement": agreement, "rows": rows}
    kind = "cuda" if device.type == "cuda" else "cpu"
    write_result(result, args.out, f"sparse_{args.model.replace('/', '--')}_{args.shapes}_{kind}.json"
                 if args.shapes == "model" else f"sparse_{args.shapes}_{kind}.json")
    return 0
