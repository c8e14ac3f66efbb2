#!/usr/bin/env bash
# The GPU check: one prepared script, at most 8 minutes on one H100 (the per-part timeouts sum to 480 s).
#
#   make DEVICE=cuda venv && bash benchmarks/gpu_check.sh
#
# Parts (benchmarks/gpu_check.py, each in its own process under its own timeout):
#   preflight  device name, memory, torch/CUDA versions, the bf16 peak used for MFU
#   sft        bt-ray's SFT job (Ray Train + TRL + bt-ray's DeepSpeed config, ZeRO-2 bf16) on a ~1B Llama
#              built from config (random init, no download): tokens/s and MFU
#   vllm       the CUDA vLLM engine on the tiny model with the [RESET] processor: bias and max_resets honoured
#   serve      one request through Ray Serve (engine=vllm, one GPU) with the real `openai` client
# Each part prints one line "GPU-CHECK <part>: ok|FAILED ..."; a summary follows.
# Exit: 0 all ok, 1 a part failed or timed out, 2 refused (no CUDA GPU: nothing heavy is run).
set -u
cd "$(dirname "$0")/.."

REFUSED=2
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# The Makefile's environment (caches per checkout, offline hub).
export BT_RAY_CACHE=${BT_RAY_CACHE:-$PWD/.cache/bt-ray}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# Refuse before any heavy work: first the driver tool, then what torch sees (the preflight part).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU-CHECK: REFUSED: no CUDA GPU on this machine (nvidia-smi is absent or lists no GPU)." \
       "benchmarks/gpu_check.sh needs one NVIDIA GPU (an H100 or H200 for the MFU figure);" \
       "on a GPU machine run: make DEVICE=cuda venv && bash benchmarks/gpu_check.sh" >&2
  exit $REFUSED
fi

LOG_DIR=${GPU_CHECK_LOG_DIR:-outputs/gpu_check}
mkdir -p "$LOG_DIR"
declare -a SUMMARY=()
FAILED=0
T0=$(date +%s)

run_part() {  # run_part <name> <timeout seconds>
  local part=$1 limit=$2 log="$LOG_DIR/$1.log" rc line start
  start=$(date +%s)
  echo "== gpu_check: $part (timeout ${limit}s, log $log)"
  timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py "$part" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  line=$(grep -a '^GPU-CHECK ' "$log" | tail -n 1)
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    line="GPU-CHECK $part: FAILED timed out after ${limit}s"
  elif [ -z "$line" ]; then
    line="GPU-CHECK $part: FAILED exit $rc without a result line (see $log)"
  fi
  SUMMARY+=("$line  [$(( $(date +%s) - start ))s, exit $rc]")
  if [ "$part" = preflight ] && [ "$rc" -eq $REFUSED ]; then
    echo "$line" >&2
    exit $REFUSED
  fi
  [ "$rc" -eq 0 ] || FAILED=1
}

run_part preflight 30
run_part sft 240
run_part vllm 90
run_part serve 120

echo
echo "== gpu_check summary ($(( $(date +%s) - T0 ))s in all; logs in $LOG_DIR)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
printf '%s\n' "${SUMMARY[@]}" > "$LOG_DIR/summary.txt"
if [ "$FAILED" -ne 0 ]; then
  echo "== gpu_check: FAILED"
  exit 1
fi
echo "== gpu_check: all parts ok"
