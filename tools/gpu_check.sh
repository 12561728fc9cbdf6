#!/usr/bin/env bash
# GPU check: effllm's GPU-only measurements in one script, at most 8 minutes on one GPU, no hub access.
#
#   tools/gpu_check.sh                  # set up if needed, then the four benchmarks below on cuda
#   tools/gpu_check.sh --dry-run        # print the set-up and benchmark commands, run nothing
#   tools/gpu_check.sh --device cpu --tiny --models tiny-llama --python .venv/bin/python   # the same commands
#                                       # on a CPU with tiny sizes (what tests/test_gpu_check.py runs)
#
# Benchmarks (python -m effllm.bench), each JSON into <out>/results/ (out: --out, else $OUT, else the repo):
#   1. sparse_codellama-13b_cuda.json        2:4 semi-structured against dense linears at the seed's
#                                            CodeLlama-13B shapes (random weights), 1 / 16 / 2048 tokens
#   2. sparse_smollm2-135m_cuda.json         the same at SmolLM2-135M's shapes, and end to end (the model
#                                            converted to 2:4 and decoded against the dense one)
#   3. early_exit_smollm2-135m_bfloat16_cuda.json   early-exit decoding (full / static / CALM / FREE / vocabulary
#   4. early_exit_gemma3-270m_bfloat16_cuda.json    pruning / self-speculation / skipping) against HF generate,
#                                            in bfloat16 on the GPU (through tools/bench_on_device.py: the
#                                            early-exit benchmark has no --device option yet)
# plus gpu_check.json (each step: command, exit code, seconds) and gpu_check.log (all output).
#
# Set-up on a bare machine (skipped when --python is given or .venv/bin/python exists): `make setup`, which
# makes .venv, installs torch through tools/install_torch.sh (the CUDA build where nvidia-smi works), effllm,
# the embedded model wheels and the built-in data. Where python3 already imports a CUDA torch, .venv is made
# with --system-site-packages first so that torch (GBs with its CUDA libraries) is reused, not downloaded. Without
# network, give a folder of wheels: --wheelhouse DIR (pip --no-index --find-links DIR). The set-up gets at most
# SETUP_LIMIT_S; each benchmark gets at most its own limit and never more than what is left of the 8 minutes.
# Exit code: 0 every step ok, 1 a step failed or ran out of time (the others still run), 2 bad arguments or no GPU.
set -uo pipefail
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)

TOTAL_LIMIT_S=${GPU_CHECK_LIMIT_S:-480}   # the whole check, set-up included
SETUP_LIMIT_S=${GPU_CHECK_SETUP_LIMIT_S:-240}
DEVICE=cuda
DTYPE=bfloat16
MODELS="smollm2-135m gemma3-270m"
PYTHON_BIN=""
WHEELHOUSE=""
OUT_DIR="${OUT:-$REPO}"
DRY_RUN=0
TINY=0
ALL_STEPS="sparse-codellama,sparse-model,early-exit"
ONLY=$ALL_STEPS

usage() {
    sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --out DIR          write DIR/results/*.json, DIR/gpu_check.json and DIR/gpu_check.log (default: $OUT, else the repo)
  --python PY        use this interpreter (effllm importable) and skip the set-up
  --wheelhouse DIR   install offline from these wheels (pip --no-index --find-links DIR)
  --device DEV       cuda (default), cuda:N, or cpu (to try the commands on a machine without a GPU)
  --dtype DTYPE      early-exit dtype (default bfloat16)
  --models "A B"     early-exit models; the first also gives the sparse benchmark's model shapes
                     (default: "smollm2-135m gemma3-270m")
  --tiny             tiny sizes: every command runs in seconds (for trying it on a CPU; the CodeLlama-13B
                     shapes still take about a minute there)
  --steps LIST       comma-separated, of sparse-codellama, sparse-model, early-exit (default: all)
  --dry-run          print the commands, run nothing
  -h, --help         this text
EOF
}

fail_usage() {
    echo "gpu_check.sh: $1" >&2
    echo "run tools/gpu_check.sh --help for the options" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || fail_usage "--out needs a folder"; OUT_DIR=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || fail_usage "--python needs an interpreter"; PYTHON_BIN=$2; shift 2 ;;
        --wheelhouse) [ $# -ge 2 ] || fail_usage "--wheelhouse needs a folder"; WHEELHOUSE=$2; shift 2 ;;
        --device) [ $# -ge 2 ] || fail_usage "--device needs cuda, cuda:N or cpu"; DEVICE=$2; shift 2 ;;
        --dtype) [ $# -ge 2 ] || fail_usage "--dtype needs float32, bfloat16 or float16"; DTYPE=$2; shift 2 ;;
        --models) [ $# -ge 2 ] || fail_usage "--models needs a quoted list of model names"; MODELS=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --steps) [ $# -ge 2 ] || fail_usage "--steps needs a list, e.g. sparse-model,early-exit"; ONLY=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail_usage "unknown argument '$1'" ;;
    esac
done
case "$DEVICE" in
    cuda|cuda:[0-9]*|cpu) ;;
    *) fail_usage "--device must be cuda, cuda:N or cpu; got '$DEVICE'" ;;
esac
case "$DTYPE" in
    float32|bfloat16|float16) ;;
    *) fail_usage "--dtype must be float32, bfloat16 or float16; got '$DTYPE'" ;;
esac
[ -n "${MODELS// /}" ] || fail_usage "--models is empty; give at least one model name"
for step in ${ONLY//,/ }; do
    case ",$ALL_STEPS," in *",$step,"*) ;; *) fail_usage "--steps: unknown step '$step'; steps: $ALL_STEPS" ;; esac
done
wanted() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
if [ -n "$PYTHON_BIN" ] && [ "$DRY_RUN" = 0 ] && ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    fail_usage "--python '$PYTHON_BIN' is not an interpreter here"
fi
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$CALLER_DIR/$OUT_DIR" ;; esac
if [ -n "$WHEELHOUSE" ]; then case "$WHEELHOUSE" in /*) ;; *) WHEELHOUSE="$CALLER_DIR/$WHEELHOUSE" ;; esac; fi
RESULTS="$OUT_DIR/results"
KIND=${DEVICE%%:*}   # cuda or cpu: the suffix of every result file
FIRST_MODEL=${MODELS%% *}
if [ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ]; then
    fail_usage "--wheelhouse '$WHEELHOUSE' is not a folder"
fi

# Sizes. Full: what fits the time on one GPU (each line's limit below); tiny: seconds on a CPU.
if [ "$TINY" = 1 ]; then
    SPARSE_TOKENS=1; SPARSE_MIN_RUN=0.001; SPARSE_ROUNDS=1; SPARSE_E2E="--prompt-tokens 8 --decode-tokens 2"
    EE_SIZES="--prompts 1 --max-new-tokens 2 --rounds 1 --calibration-prompts 0 --no-fitted-exits --methods full"
else
    SPARSE_TOKENS=1,16,2048; SPARSE_MIN_RUN=0.2; SPARSE_ROUNDS=3; SPARSE_E2E="--prompt-tokens 512 --decode-tokens 32"
    EE_SIZES="--prompts 4 --max-new-tokens 32 --rounds 3 --calibration-prompts 8 --calibration-tokens 16"
fi

# name|limit in seconds|command (words split on spaces; no argument holds a space)
STEPS=()
wanted sparse-codellama && STEPS+=("sparse_codellama-13b|100|-m effllm.bench sparse --device $DEVICE --shapes codellama-13b --tokens $SPARSE_TOKENS --min-run-time $SPARSE_MIN_RUN --rounds $SPARSE_ROUNDS --no-end-to-end --out $RESULTS/sparse_codellama-13b_$KIND.json")
wanted sparse-model && STEPS+=("sparse_$FIRST_MODEL|100|-m effllm.bench sparse --device $DEVICE --shapes model --model $FIRST_MODEL --tokens $SPARSE_TOKENS --min-run-time $SPARSE_MIN_RUN --rounds $SPARSE_ROUNDS $SPARSE_E2E --out $RESULTS/sparse_${FIRST_MODEL}_$KIND.json")
wanted early-exit && for model in $MODELS; do
    STEPS+=("early_exit_$model|150|tools/bench_on_device.py --device $DEVICE early-exit --model $model --dtype $DTYPE $EE_SIZES --out $RESULTS/early_exit_${model}_${DTYPE}_$KIND.json")
done

SETUP=()
if [ -z "$PYTHON_BIN" ]; then
    PYTHON_BIN="$REPO/.venv/bin/python"
    if [ ! -x "$PYTHON_BIN" ]; then
        SETUP+=("if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then python3 -m venv --system-site-packages .venv; fi")
        SETUP+=("make setup PYTHON=python3")
    fi
fi
if [ -n "$WHEELHOUSE" ]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELHOUSE"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1   # no hub: embedded models and built-in data

if [ "$DRY_RUN" = 1 ]; then
    echo "# set-up (limit ${SETUP_LIMIT_S} s)${WHEELHOUSE:+, offline from $PIP_FIND_LINKS}"
    if [ ${#SETUP[@]} -eq 0 ]; then echo "# none: $PYTHON_BIN"; fi
    for command in "${SETUP[@]}"; do echo "$command"; done
    echo "# benchmarks (the whole check at most ${TOTAL_LIMIT_S} s)"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        echo "timeout ${limit} $PYTHON_BIN $command"
    done
    exit 0
fi

mkdir -p "$RESULTS" || fail_usage "cannot create the --out folder $OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
RECORDS=()
STATUS=0
record() {  # name exit-code seconds command
    local state=ok
    [ "$2" = 0 ] || state=failed
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && state="timed out"
    [ "$2" = 0 ] || STATUS=1
    RECORDS+=("{\"step\": \"$1\", \"status\": \"$state\", \"exit_code\": $2, \"seconds\": $3, \"command\": \"$4\"}")
    printf '%-32s %-9s %4ss\n' "$1" "$state" "$3" | tee -a "$LOG"
}
run_step() {  # name limit command...
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_LIMIT_S - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, the ${TOTAL_LIMIT_S} s of the check are used up" | tee -a "$LOG"
        record "$name" 124 0 "$*"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    record "$name" $? $((SECONDS - start)) "$*"
}

{
    echo "gpu_check.sh on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} >>"$LOG" 2>&1
if [ ${#SETUP[@]} -gt 0 ]; then  # one step, one limit for the whole set-up
    joined=$(printf '%s && ' "${SETUP[@]}")
    run_step setup "$SETUP_LIMIT_S" bash -c "${joined% && }"
fi
if ! "$PYTHON_BIN" -c "import effllm, torch" >>"$LOG" 2>&1; then
    echo "gpu_check.sh: $PYTHON_BIN cannot import effllm and torch (set-up failed? see $LOG)" >&2
    exit 2
fi
if [ "$KIND" = cuda ] && ! "$PYTHON_BIN" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch under $PYTHON_BIN sees no CUDA GPU (a CPU build of torch, or no driver); " \
         "on a machine without a GPU try: tools/gpu_check.sh --device cpu --tiny" >&2
    exit 2
fi
"$PYTHON_BIN" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$LOG" 2>&1
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    # shellcheck disable=SC2086  # the command's words, split on spaces on purpose
    run_step "$name" "$limit" "$PYTHON_BIN" $command
done

joined=$(IFS=,; echo "${RECORDS[*]}")
printf '{"device": "%s", "tiny": %s, "seconds": %s, "ok": %s, "steps": [%s]}\n' "$DEVICE" \
    "$([ "$TINY" = 1 ] && echo true || echo false)" "$SECONDS" "$([ "$STATUS" = 0 ] && echo true || echo false)" \
    "$joined" >"$OUT_DIR/gpu_check.json"
echo "gpu check: $([ "$STATUS" = 0 ] && echo ok || echo 'some step failed') in ${SECONDS} s; results in $RESULTS, log $LOG"
exit "$STATUS"
