#!/bin/bash
# The GPU run: installs, runs the GPU tests and the benchmarks on one NVIDIA GPU, writes the results.
#
#   scripts/gpu_run.sh OUT_DIR [BUDGET_S]
#
# OUT_DIR gets at most 5 files, rewritten after every stage so that a run cut short still leaves its
# results: results.md (tables), results.json (all numbers), gpu_run.log (this script's output),
# logs.tar.gz (server, test and benchmark logs) and optim.md. BUDGET_S (default 560) bounds the run: a
# stage that would not fit in what is left is skipped and said so. GPU_RUN_STAGES (comma list) picks
# stages: optim,tests,barrier,visibility,serving,memory,checkpoint,train,restart,qwen35 (default: all
# but restart and qwen35, each of which starts one more server), cuda-tests (the optimizer's and the
# trainer's CUDA tests only), and the large-model stages (random weights of the real shapes served with
# --load-format dummy and trained in place, measured in phases by benchmarks/large_model_bench.py:
# training alone, then serving idle, while training at several busy shares, and with the step barrier):
# large-q8b (Qwen3-8B shape), large-q06 (0.6B; its server starts beside the 8B one and is measured
# after it), large-q32b (32B at --gpu-memory-utilization 0.75; a call of its own), large-q30a3b (the
# Qwen3-30B-A3B mixture of experts; vLLM's fused-MoE kernels must be in the carry), and the tensor-parallel stages for a machine
# with two GPUs: tp2 (the tensor-parallel tests at --tensor-parallel-size 2 on the GPUs, then the
# large-model benchmark of the Qwen3-8B shape at TP=2) and tp2-large (the Qwen3-32B shape at TP=2);
# the benchmark records every GPU's memory after training. Needs vLLM: installed, or the parts
# packed by scripts/gpu_bundle.sh in $GPU_CARRY (default .devcarry), unpacked by its device_env.sh.
#
# Plan (one H200, a random Qwen3-0.6B-shaped model, torch.compile and CUDA graphs on):
#   the optimizer's CUDA tests (a failure stops the run) and benchmark while the model is built -> two
#   servers started at once, each with its own KV-cache size so that their memory profiling cannot
#   disturb each other: A (HOGWILD; dev mode and a worker extension for the comparison with vLLM's own
#   weight-update path) and B (--train-barrier) ->
#   on A the tests; on B serving with the barrier; on A visibility, serving, memory, checkpoint latency,
#   training throughput (most wanted first, so a short budget cuts the least wanted) -> optionally a
#   checkpoint into the served directory and a server restarted on it (restart test).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=$(mkdir -p "${1:?usage: gpu_run.sh OUT_DIR [BUDGET_S]}" && cd "$1" && pwd)
BUDGET=${2:-${GPU_RUN_BUDGET_S:-560}}
STAGES=${GPU_RUN_STAGES:-optim,tests,barrier,visibility,serving,memory,checkpoint,train}
CARRY=${GPU_CARRY:-.devcarry}
WORK=${GPU_RUN_WORK:-/tmp/apollo-gpu-run}
PORT_A=${GPU_RUN_PORT_A:-8000}
PORT_B=${GPU_RUN_PORT_B:-8001}
URLA=http://127.0.0.1:$PORT_A
URLB=http://127.0.0.1:$PORT_B
RUNA=$WORK/run-A
T0=$(date +%s)
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/json"
: > "$WORK/rows.md"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

log() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { [[ ",$STAGES," == *",$1,"* ]]; }
note() { echo "$*" >> "$WORK/notes.txt"; }

collect() {  # (re)write OUT_DIR's files from what WORK holds now
  python3 - "$WORK" "$OUT" <<'EOF'
import json, sys, time
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
data = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": {}}
for f in sorted((work / "json").glob("*.json")):
    try:
        data["results"][f.stem] = json.loads(f.read_text())
    except ValueError:
        pass
for name in ("gpu.txt", "versions.txt", "notes.txt", "serverinfo.txt"):
    p = work / name
    data[name.split(".")[0]] = p.read_text().splitlines() if p.exists() else []
(out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
lines = ["# apollo-train GPU run", "", f"{data['time']}; GPU: {' '.join(data['gpu'])}; {' '.join(data['versions'])}",
         "", "## Measurements", "", "| what | | | | |", "|---|---|---|---|---|"]
lines += (work / "rows.md").read_text().splitlines() or ["| (none) |"]
if (work / "optim.md").exists():
    lines += ["", "## Optimizer step", "", *(work / "optim.md").read_text().splitlines()]
lines += ["", "## Stages", ""] + [f"- {n}" for n in data["notes"]]
lines += ["", "## Server log lines (compilation, CUDA graphs)", "", "```", *data["serverinfo"], "```"]
(out / "results.md").write_text("\n".join(lines) + "\n")
EOF
  [ -f "$WORK/optim.md" ] && cp "$WORK/optim.md" "$OUT/optim.md"
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs json $(cd "$WORK" && ls notes.txt 2>/dev/null) 2>/dev/null
  return 0
}

# step NAME NEEDED_S TIMEOUT_S CMD...: run CMD (output in logs/NAME.log, table rows kept) if it fits.
step() {
  local name=$1 need=$2 limit=$3; shift 3
  if [ "$(left)" -lt "$need" ]; then
    log "SKIP $name: $(left) s left, needs about $need s"; note "$name: skipped, out of time"; return 1
  fi
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  log "RUN  $name (limit $limit s)"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  [ "$name" != optim ] && grep -h '^|' "$WORK/logs/$name.log" >> "$WORK/rows.md"
  log "DONE $name rc=$rc in $(( $(date +%s) - t )) s"; tail -n 4 "$WORK/logs/$name.log"
  note "$name: rc=$rc, $(( $(date +%s) - t )) s"
  collect
  return $rc
}

# ------------------------------------------------------------------ setup
log "setup"
if ! python3 -c 'import vllm' 2>/dev/null; then
  [ -f "$CARRY/device_env.sh" ] || { log "no vLLM and no $CARRY/device_env.sh (run scripts/gpu_bundle.sh)"; exit 2; }
  # shellcheck disable=SC1090
  source "$CARRY/device_env.sh" "$CARRY" || exit 2
fi
export PYTHONPATH="$REPO/$CARRY/pylib:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1

# Without CUDA (a dry run on the CPU build of vLLM) the model is tiny and vLLM runs eagerly.
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE=cuda; SHAPE='hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936'
  # GPU_RUN_SHAPE=tiny: the tiny test model (a quick check of the GPU tests; no meaningful numbers)
  [ "${GPU_RUN_SHAPE:-}" = tiny ] && SHAPE='num_hidden_layers=2'
  # A fixed KV cache (8 GiB) instead of memory profiling: two servers start side by side. The
  # utilization (each server checks it is free at start) leaves the rest to training workers.
  SERVE_FLAGS=(--gpu-memory-utilization 0.3 --kv-cache-memory-bytes 8589934592 --max-model-len 4096 --max-num-seqs 64)
  OPTIM_ARGS=(--device cuda)
else
  DEVICE=cpu; SHAPE='num_hidden_layers=2'
  SERVE_FLAGS=(--enforce-eager --max-model-len 4096 --max-num-seqs 64)
  OPTIM_ARGS=(--device cpu --steps 2)
fi
MODEL=$WORK/model
log "building the model in $MODEL (background, $DEVICE shape)"
python3 - > "$WORK/logs/model.log" 2>&1 <<EOF &
from apollo_train.tiny_models import build_tiny_model
build_tiny_model("$MODEL", "qwen3", $SHAPE, tie_word_embeddings=True)
EOF
MODEL_PID=$!
# the plugins' entry points need the project installed (the model build above needs only PYTHONPATH)
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i "running pip as" | tail -3
SITE=$(python3 -c 'import vllm, os; print(os.path.dirname(os.path.dirname(vllm.__file__)))')
(nice python3 -m compileall -q -j 8 "$SITE/vllm" > /dev/null 2>&1 &)  # first imports are slow otherwise
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt" 2>/dev/null
python3 -c 'import torch, transformers, vllm; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)' > "$WORK/versions.txt"
cat "$WORK/gpu.txt" "$WORK/versions.txt"

# ------------------------------------------------------------------ optimizer step (no server running)
if want optim; then
  # the optimizer's kernels first: the training worker uses them, so without them nothing else is worth running
  if [ $DEVICE = cuda ] && ! step optim-tests 30 120 python3 -m pytest tests/test_optim.py -q -p no:cacheprovider -k cuda; then
    log "the optimizer's CUDA tests failed: stopping"; exit 3
  fi
  step optim 60 200 python3 benchmarks/optim_bench.py "${OPTIM_ARGS[@]}" --out "$WORK/optim.md"
fi
wait $MODEL_PID || { log "model build failed"; cat "$WORK/logs/model.log"; }
python3 -c "import json; c=json.load(open('$MODEL/config.json')); print('model', c['architectures'], c['num_hidden_layers'], 'layers, vocab', c['vocab_size'])"

# ------------------------------------------------------------------ tensor parallelism (two GPUs)
tp2() {  # tp2 STAGE SHAPE GPU_UTIL
  want "$1" || return 0
  if [ $DEVICE != cuda ] || [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
    log "SKIP $1: needs two GPUs"; note "$1: skipped, needs two GPUs"; return 0
  fi
  [ "$1" = tp2 ] && step tp2-tests 150 420 python3 -m pytest tests/test_tensor_parallel.py \
    tests/test_tensor_parallel_e2e.py -v -p no:cacheprovider
  step "$1-$2" 240 590 python3 benchmarks/large_model_bench.py --shape "$2" --label "$2 TP=2" \
    --work "$WORK/large" --port "$PORT_A" --json "$WORK/json/$1-$2.json" -- --tensor-parallel-size 2 \
    --gpu-memory-utilization "$3"
}
tp2 tp2 q8b 0.5
tp2 tp2-large q32b 0.7

# ------------------------------------------------------------------ servers
launch() {  # launch NAME PORT MODEL_DIR [flags...]; extra environment from SERVER_ENV
  local name=$1 port=$2 model=$3; shift 3
  mkdir -p "$WORK/run-$name"
  log "starting server $name on :$port: ${SERVE_FLAGS[*]} $*"
  env APOLLO_TRAIN_RUN_DIR="$WORK/run-$name" APOLLO_TRAIN_STATE_DIR="$WORK/state-$name" \
      VLLM_CACHE_ROOT="$WORK/vllm-cache-${CACHE_OF:-$name}" ${SERVER_ENV:-} \
    setsid python3 -m apollo_train.cli serve "$model" --port "$port" "${SERVE_FLAGS[@]}" "$@" \
    > "$WORK/logs/server-$name.log" 2>&1 &
  echo $! > "$WORK/server-$name.pid"
  date +%s > "$WORK/server-$name.t0"
}
wait_ready() {  # wait_ready NAME PORT: 0 when /health answers and the training worker left "starting"
  local name=$1 port=$2 pid state
  pid=$(cat "$WORK/server-$name.pid")
  while true; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "server $name exited"; tail -n 30 "$WORK/logs/server-$name.log"; note "server $name: exited at start"; return 1
    fi
    if [ "$(left)" -lt 15 ]; then log "server $name not ready in time"; note "server $name: not ready in time"; return 1; fi
    state=$(python3 -c "
from apollo_train.client import Client
c = Client('http://127.0.0.1:$port', timeout=5)
print(c.status().get('state') if c.healthy() else 'down')" 2>/dev/null)
    case "$state" in
      idle|training|checkpointing) break ;;
      error) python3 -c "from apollo_train.client import Client; print(Client('http://127.0.0.1:$port').status())"; break ;;
    esac
    sleep 2
  done
  local took=$(( $(date +%s) - $(cat "$WORK/server-$name.t0") ))
  log "server $name ready ($state) after $took s"
  echo "{\"server\": \"$name\", \"ready_s\": $took, \"state\": \"$state\", \"flags\": \"${SERVE_FLAGS[*]}\"}" \
    > "$WORK/json/server-$name.json"
  note "server $name: ready ($state) after $took s"
  grep -h -i -E "cuda ?graph|torch.compile|compil.*took|attention backend|flash" "$WORK/logs/server-$name.log" \
    | grep -v -i warn | tail -n 8 | sed "s/^/[$name] /" >> "$WORK/serverinfo.txt"
  collect
  [ "$state" != error ]
}
stop_server() {
  local name=$1 pid
  pid=$(cat "$WORK/server-$name.pid" 2>/dev/null) || return 0
  kill -0 -- "-$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null
  # wait for the whole process group (API server, engine core, training worker) and its GPU memory
  for _ in $(seq 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null && sleep 2
  log "server $name stopped"
}
trap 'stop_server A; stop_server B; stop_server R; stop_server Q06; collect' EXIT

# ------------------------------------------------------------------ large models (a server each)
large() {  # large SHAPE GPU_UTIL KV_GIB [extra bench flags]: one server, measured in phases
  local shape=$1 util=$2 kv=$3; shift 3
  want "large-$shape" || return 0
  step "large-$shape" 200 590 python3 benchmarks/large_model_bench.py --shape "$shape" --round-s 8 \
    --work "$WORK/large-$shape" --port "$PORT_A" --json "$WORK/json/large-$shape.json" "$@" -- \
    --gpu-memory-utilization "$util" ${kv:+--kv-cache-memory-bytes $((kv << 30))}
}
if [ $DEVICE = cuda ]; then
  if want large-q06; then  # its server starts now, beside the 8B one (a fixed KV cache: no profiling to disturb)
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from large_model_bench import config_only_model; config_only_model(Path('$WORK/large-q06/model'), 'q06')"
    CACHE_OF=q06 launch Q06 "$PORT_B" "$WORK/large-q06/model" --load-format dummy --max-model-len 4096 \
      --gpu-memory-utilization 0.15 --kv-cache-memory-bytes $((4 << 30))
  fi
  large q8b 0.5 16 --shares 1,0.5,0.25 --barrier-shares 0.25
  if want large-q06 && wait_ready Q06 "$PORT_B"; then
    step large-q06 120 400 python3 benchmarks/large_model_bench.py --url "$URLB" --label q06 --round-s 8 \
      --alone "" --shares 0.25 --barrier-shares 0.25,1 --json "$WORK/json/large-q06.json"
    stop_server Q06
  fi
  large q32b 0.75 "" --round-s 10 --alone in-backward --shares 1,0.5,0.35,0.25 --barrier-shares ""
  large q30a3b 0.7 "" --round-s 10 --alone in-backward --shares 1,0.5,0.25 --barrier-shares ""
  if want cuda-tests; then
    step cuda-tests 45 240 python3 -m pytest -q -p no:cacheprovider tests/test_optim.py tests/test_trainer.py -k cuda
  fi
fi


A_UP=0; B_UP=0
NEED_A=0
for s in tests visibility serving memory checkpoint train restart; do want $s && NEED_A=1; done
if [ $NEED_A = 0 ] && ! want barrier; then
  log "no stage needs servers A and B"
elif [ "$(left)" -ge 150 ]; then
  [ $NEED_A = 1 ] && SERVER_ENV="VLLM_SERVER_DEV_MODE=1" launch A "$PORT_A" "$MODEL" \
    --worker-extension-cls benchmarks.vllm_weight_update.WeightUpdateExtension
  want barrier && SERVER_ENV="" launch B "$PORT_B" "$MODEL" --train-barrier
  [ $NEED_A = 1 ] && wait_ready A "$PORT_A" && A_UP=1
  want barrier && wait_ready B "$PORT_B" && B_UP=1
else
  log "SKIP servers: $(left) s left"; note "servers: skipped, out of time"
fi

if [ $A_UP = 1 ]; then
  # untrained memory snapshot first, then the tests (their parity check needs untrained weights)
  want memory && step memory-snapshot 20 40 python3 benchmarks/memory_bench.py --url $URLA --run-dir "$RUNA" \
    --snapshot-to "$WORK/json/memory-before.json"
  want tests && APOLLO_TRAIN_GPU_URL=$URLA APOLLO_TRAIN_GPU_RUN_DIR=$RUNA \
    step tests 40 150 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -k "not restart and not qwen3_5"
fi
if [ $B_UP = 1 ]; then
  step serving-barrier 25 90 python3 benchmarks/serving_bench.py --url $URLB --label barrier --rounds 3 \
    --json "$WORK/json/serving-barrier.json"
  stop_server B
fi
if [ $A_UP = 1 ]; then
  want visibility && step visibility 25 90 python3 benchmarks/visibility_bench.py --url $URLA --run-dir "$RUNA" \
    --trials 3 --json "$WORK/json/visibility.json"
  want serving && step serving-hogwild 25 90 python3 benchmarks/serving_bench.py --url $URLA --label hogwild \
    --rounds 3 --json "$WORK/json/serving-hogwild.json"
  want memory && step loss-memory 20 90 python3 benchmarks/loss_memory_bench.py --hidden 1024 \
    --json "$WORK/json/loss-memory.json"
  want memory && step memory 20 90 python3 benchmarks/memory_bench.py --url $URLA --run-dir "$RUNA" --breakdown \
    --examples 32 --snapshot-from "$WORK/json/memory-before.json" --json "$WORK/json/memory.json"
  want checkpoint && step checkpoint 20 90 python3 benchmarks/checkpoint_bench.py --url $URLA --target new \
    --idle-s 5 --min-samples 200 --max-checkpoints 4 --json "$WORK/json/checkpoint.json"
  want train && step train 15 90 python3 benchmarks/train_throughput_bench.py --url $URLA \
    --examples 32 --epochs 3 --json "$WORK/json/train.json"

  if want restart && [ "$(left)" -ge 120 ]; then
    # sync the weights into the served directory, note what a restart must serve, restart on it
    step restart-prep 15 60 python3 - <<EOF
import json
from transformers import AutoTokenizer
from apollo_train.client import Client
c = Client("$URLA")
job = c.checkpoint(None, wait=True)
assert job["state"] == "done", job
q = "What is the capital of the small country by the river?"
a = "The capital is the old town by the bridge, past the market and the station.<|im_end|>"
prompt = AutoTokenizer.from_pretrained("$MODEL").apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
st = c.status()
expect = {"prompt": prompt, "answer": a, "logprob": c.answer_logprob(prompt, a), "step": st["step"], "checkpoint": job}
open("$WORK/json/restart-expect.json", "w").write(json.dumps(expect))
print("| restart expectation | step", st["step"], "| logprob", round(expect["logprob"], 4), "|")
EOF
    stop_server A
    # same flags and compile cache as A (a warm start); the checkpoint's stamp names A's training state
    CACHE_OF=A SERVER_ENV="VLLM_SERVER_DEV_MODE=1" launch R "$PORT_B" "$MODEL" \
      --worker-extension-cls benchmarks.vllm_weight_update.WeightUpdateExtension
    if wait_ready R "$PORT_B"; then
      APOLLO_TRAIN_GPU_URL=$URLB APOLLO_TRAIN_GPU_RUN_DIR=$WORK/run-R APOLLO_TRAIN_GPU_EXPECT=$WORK/json/restart-expect.json \
        step tests-restart 15 60 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -k restart
      stop_server R
    fi
  fi
  stop_server A
fi

if want qwen35; then
  APOLLO_TRAIN_GPU_QWEN35=1 step qwen35 240 300 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -k qwen3_5
fi

log "collecting results"
collect
ls -la "$OUT"
cat "$OUT/results.md"
log "end"
