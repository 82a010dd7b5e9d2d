# shellcheck shell=bash
# Shared by launch/*.sh (source it; do not run it). Starts vLLM workers and a
# router in front, and stops every one of them when the script exits, is
# interrupted, or any of them dies: a half-dead deployment is worse than none.
#
# Two fleets, picked by DYNAMO:
#   NVIDIA Dynamo (when $PYTHON has it: scripts/setup_dynamo.sh): `python -m dynamo.frontend
#     --router-mode kv` in front of `python -m dynamo.vllm` workers with kvbm as their connector
#     (PdConnector on prefill workers), as in the seed's guide; kvbm's KV events make the router
#     see G2/G3/G4. Discovery through files, TCP request plane, ZMQ event plane: no etcd, no NATS.
#   kvbm's own (otherwise): `vllm serve` / `kvbm serve` workers behind `kvbm router`.
#
# Settings (environment variables; defaults in brackets):
#   DYNAMO [auto]      1: Dynamo's frontend and workers; 0: kvbm's router and vLLM's server;
#                      auto: Dynamo when `$PYTHON -m dynamo.vllm` is importable
#   ROUTER_MODE [kv]   Dynamo's --router-mode (kv, round-robin, random)
#   DYNAMO_PLANES ["--discovery-backend file --request-plane tcp --event-plane zmq"]  Dynamo's transports
#                      (file discovery keeps its files in a private directory, DYN_FILE_KV)
#   AGG_GPUS [AGG_GPU or 0]   agg_kvbm.sh with Dynamo: one aggregated worker per listed GPU
#   MODEL [Qwen/Qwen3-0.6B]   HTTP_PORT [8000]   HTTP_HOST [0.0.0.0]
#   CPU_ONLY [0]       1: vLLM's CPU backend (`kvbm serve`, NIXL over host memory, small sizes)
#   PYTHON [python3]   the interpreter that has kvbm and vLLM installed
#   VLLM_SERVE [vllm serve]   the GPU-mode server command (CPU mode uses `$PYTHON -m kvbm serve`)
#   WORKER_ARGS / PREFILL_ARGS / DECODE_ARGS / AGG_ARGS / ROUTER_ARGS   extra arguments (word-split;
#                      ROUTER_ARGS go to Dynamo's frontend in Dynamo mode)
#   WORKER_HOST [127.0.0.1]   address workers listen on (the router connects there)
#   PREFILL_PORT_BASE [8100]  DECODE_PORT_BASE [8200]  worker i listens on BASE+i
#   NIXL_PORT_BASE [5600]     worker i's NIXL side channel: BASE + 8*i (prefill first, then decode)
#   KVBM_METRICS_PORT_BASE [6880]  kvbm worker i's metrics port: BASE+i. (kvbm's leader/worker handshake
#                      needs no ports: every rank of a worker is on this host, so it uses private Unix sockets.)
#   DYN_KVBM_CPU_CACHE_GB [20; 1 in CPU mode]   kvbm's host (G2) tier per kvbm worker
#   KVBM_NIXL_PROGRESS_DELAY_US [unset; 1000 in CPU mode]  pause of NIXL's progress thread between polls
#   CPU_BIND [nobind for disaggregated CPU mode]  CPU mode: space-separated VLLM_CPU_OMP_THREADS_BIND
#                      values, one per worker, cycled (e.g. "0-7 8-15"). vLLM's automatic binding assumes
#                      one engine per host: several engines would all pin their compute threads, and the
#                      NIXL threads they start, to the same cores and starve each other for tens of seconds.
#   LOG_DIR            if set, each process logs to LOG_DIR/<name>.log instead of this terminal
#   STOP_TIMEOUT [20]  seconds between SIGTERM and SIGKILL when stopping
#   STOP_ON_WORKER_EXIT [1]   0: a worker that dies is only reported (the router takes it out
#                      of rotation and serves on with the others); the router dying still stops all

set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3-0.6B}
HTTP_PORT=${HTTP_PORT:-8000}
HTTP_HOST=${HTTP_HOST:-0.0.0.0}
CPU_ONLY=${CPU_ONLY:-0}
PYTHON=${PYTHON:-python3}
WORKER_HOST=${WORKER_HOST:-127.0.0.1}
PREFILL_PORT_BASE=${PREFILL_PORT_BASE:-8100}
DECODE_PORT_BASE=${DECODE_PORT_BASE:-8200}
NIXL_PORT_BASE=${NIXL_PORT_BASE:-5600}
KVBM_METRICS_PORT_BASE=${KVBM_METRICS_PORT_BASE:-6880}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
LOG_DIR=${LOG_DIR:-}
STOP_ON_WORKER_EXIT=${STOP_ON_WORKER_EXIT:-1}
read -r -a WORKER_EXTRA <<< "${WORKER_ARGS:-}"
read -r -a PREFILL_EXTRA <<< "${PREFILL_ARGS:-}"
read -r -a DECODE_EXTRA <<< "${DECODE_ARGS:-}"
read -r -a ROUTER_EXTRA <<< "${ROUTER_ARGS:-}"
read -r -a AGG_EXTRA <<< "${AGG_ARGS:-}"
read -r -a CPU_BIND_LIST <<< "${CPU_BIND:-}"
DYNAMO=${DYNAMO:-auto}
if [ "$DYNAMO" = auto ]; then
  DYNAMO=0
  if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("dynamo.vllm") is None)' \
      >/dev/null 2>&1; then
    DYNAMO=1
  fi
fi
ROUTER_MODE=${ROUTER_MODE:-kv}
read -r -a DYNAMO_PLANE_ARGS <<< "${DYNAMO_PLANES:---discovery-backend file --request-plane tcp --event-plane zmq}"
RUN_DIR=""
if [ "$DYNAMO" = 1 ]; then
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kvbm-dynamo.XXXXXX")
  export DYN_FILE_KV=${DYN_FILE_KV:-$RUN_DIR/discovery}
  # Dynamo's own sockets otherwise use the host's first address; keep them where the workers listen.
  export DYN_TCP_RPC_HOST=${DYN_TCP_RPC_HOST:-$WORKER_HOST}
  export DYN_TCP_RESPONSE_STREAM_HOST=${DYN_TCP_RESPONSE_STREAM_HOST:-$WORKER_HOST}
  export DYN_EVENT_PLANE_HOST=${DYN_EVENT_PLANE_HOST:-$WORKER_HOST}
fi

if [ "$CPU_ONLY" = 1 ]; then
  export DYN_KVBM_CPU_CACHE_GB=${DYN_KVBM_CPU_CACHE_GB:-1}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}   # GiB of KV cache per worker
  # NIXL's progress thread otherwise spins a whole core per worker (kvbm/disagg/nixl.py).
  export KVBM_NIXL_PROGRESS_DELAY_US=${KVBM_NIXL_PROGRESS_DELAY_US:-1000}
  SERVE=("$PYTHON" -m kvbm serve)
  KV_DEVICE=(--kv-buffer-device cpu)
else
  export DYN_KVBM_CPU_CACHE_GB=${DYN_KVBM_CPU_CACHE_GB:-20}
  read -r -a SERVE <<< "${VLLM_SERVE:-vllm serve}"
  KV_DEVICE=()
fi
export VLLM_NIXL_SIDE_CHANNEL_HOST=${VLLM_NIXL_SIDE_CHANNEL_HOST:-127.0.0.1}

PIDS=()
NAMES=()
WORKER_COUNT=0
STOPPING=0

log() { echo "[launch] $*" >&2; }

# stop_all: SIGTERM every process group we started, then SIGKILL what is left.
stop_all() {
  [ "$STOPPING" = 1 ] && return
  STOPPING=1
  trap '' INT TERM # a second Ctrl-C must not cut the cleanup short and orphan workers
  local pid deadline
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  for pid in "${PIDS[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ -n "$RUN_DIR" ]; then rm -rf "$RUN_DIR"; fi
  log "all processes stopped"
}

trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME COMMAND...: run COMMAND in its own process group (so stopping it
# also stops vLLM's engine and worker processes).
start() {
  local name=$1
  shift
  if [ -n "$LOG_DIR" ]; then
    mkdir -p "$LOG_DIR"
    setsid "$@" >"$LOG_DIR/$name.log" 2>&1 &
    echo "$!" >"$LOG_DIR/$name.pid"
  else
    setsid "$@" &
  fi
  PIDS+=("$!")
  NAMES+=("$name")
  log "started $name (pid $!)"
}

# worker_env INDEX DEVICE KVBM(0/1): the environment of the INDEX-th worker.
worker_env() {
  local i=$1 device=$2 kvbm=$3
  WORKER_ENV=("VLLM_NIXL_SIDE_CHANNEL_PORT=$((NIXL_PORT_BASE + 8 * i))")
  if [ "$CPU_ONLY" = 1 ]; then
    if [ "${#CPU_BIND_LIST[@]}" -gt 0 ]; then
      WORKER_ENV+=("VLLM_CPU_OMP_THREADS_BIND=${CPU_BIND_LIST[$((i % ${#CPU_BIND_LIST[@]}))]}")
    fi
  else
    WORKER_ENV+=("CUDA_VISIBLE_DEVICES=$device")
  fi
  if [ "$kvbm" = 1 ]; then
    WORKER_ENV+=("DYN_KVBM_METRICS_PORT=$((KVBM_METRICS_PORT_BASE + i))")
  fi
}

# start_worker NAME ROLE(prefill|decode|agg) DEVICE PORT EXTRA_ARGS...
start_worker() {
  local name=$1 role=$2 device=$3 port=$4
  shift 4
  local kvbm=1 config
  [ "$role" = decode ] && kvbm=0
  config=$("$PYTHON" -m kvbm.disagg.config "$role" "${KV_DEVICE[@]}")
  worker_env "$WORKER_COUNT" "$device" "$kvbm"
  WORKER_COUNT=$((WORKER_COUNT + 1))
  start "$name" env "${WORKER_ENV[@]}" "${SERVE[@]}" "$MODEL" --host "$WORKER_HOST" --port "$port" \
    --kv-transfer-config "$config" "${WORKER_EXTRA[@]}" "$@"
}

# start_frontend: Dynamo's frontend (OpenAI API on HTTP_PORT, KV-aware router).
start_frontend() {
  start frontend "$PYTHON" -m dynamo.frontend --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" \
    --router-mode "$ROUTER_MODE" "${DYNAMO_PLANE_ARGS[@]}" "${ROUTER_EXTRA[@]}"
}

# start_dynamo_worker NAME ROLE(agg|prefill|decode) DEVICE EXTRA_ARGS...: `python -m dynamo.vllm`
# with kvbm (agg: DynamoConnector; prefill: PdConnector = kvbm + NIXL; decode: NIXL only), its vLLM
# KV events (G1 and kvbm's tiers) on a private ipc socket that its Dynamo publisher reads.
start_dynamo_worker() {
  local name=$1 role=$2 device=$3
  shift 3
  local kvbm=1 config config_role=$role mode=() events
  case "$role" in
    prefill) config_role=pd; mode=(--disaggregation-mode prefill) ;;
    decode) kvbm=0; mode=(--disaggregation-mode decode) ;;
  esac
  config=$("$PYTHON" -m kvbm.disagg.config "$config_role" "${KV_DEVICE[@]}")
  events="{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"ipc://$RUN_DIR/kv-events-$WORKER_COUNT\"}"
  worker_env "$WORKER_COUNT" "$device" "$kvbm"
  WORKER_COUNT=$((WORKER_COUNT + 1))
  start "$name" env "${WORKER_ENV[@]}" "$PYTHON" -m dynamo.vllm --model "$MODEL" "${mode[@]}" \
    "${DYNAMO_PLANE_ARGS[@]}" --kv-transfer-config "$config" --kv-events-config "$events" "${WORKER_EXTRA[@]}" "$@"
}

# run_agg "GPUS": Dynamo's frontend and one aggregated kvbm worker per listed GPU.
run_agg() {
  local gpus i=0 gpu
  read -r -a gpus <<< "$1"
  if [ "$CPU_ONLY" = 1 ] && [ "${#gpus[@]}" -gt 1 ] && [ "${#CPU_BIND_LIST[@]}" -eq 0 ]; then
    CPU_BIND_LIST=(nobind) # several engines on one host: let the kernel spread them (see CPU_BIND above)
  fi
  start_frontend
  for gpu in "${gpus[@]}"; do
    start_dynamo_worker "agg$i" agg "$gpu" "${AGG_EXTRA[@]}"
    i=$((i + 1))
  done
  log "Dynamo: frontend (--router-mode $ROUTER_MODE) + ${#gpus[@]} aggregated kvbm worker(s) of $MODEL; OpenAI API at http://$HTTP_HOST:$HTTP_PORT/v1 once the workers registered"
  wait_any
}

# run_disagg "PREFILL_GPUS" "DECODE_GPUS": one worker per listed GPU (in CPU
# mode only the count matters), then the router on HTTP_PORT.
run_disagg() {
  local prefill_gpus decode_gpus i gpu
  read -r -a prefill_gpus <<< "$1"
  read -r -a decode_gpus <<< "$2"
  if [ "$CPU_ONLY" = 1 ] && [ "${#CPU_BIND_LIST[@]}" -eq 0 ]; then
    CPU_BIND_LIST=(nobind) # several engines on one host: let the kernel spread them (see CPU_BIND above)
  fi
  if [ "$DYNAMO" = 1 ]; then
    start_frontend
    i=0
    for gpu in "${prefill_gpus[@]}"; do
      start_dynamo_worker "prefill$i" prefill "$gpu" --disable-hybrid-kv-cache-manager "${PREFILL_EXTRA[@]}"
      i=$((i + 1))
    done
    i=0
    for gpu in "${decode_gpus[@]}"; do
      start_dynamo_worker "decode$i" decode "$gpu" --disable-hybrid-kv-cache-manager "${DECODE_EXTRA[@]}"
      i=$((i + 1))
    done
    log "Dynamo: frontend (--router-mode $ROUTER_MODE) + ${#prefill_gpus[@]} prefill (kvbm + NIXL) + ${#decode_gpus[@]} decode worker(s) of $MODEL; OpenAI API at http://$HTTP_HOST:$HTTP_PORT/v1 once the workers registered"
    wait_any
  fi
  local router=("$PYTHON" -m kvbm router --host "$HTTP_HOST" --port "$HTTP_PORT")
  # Prefill workers have the hybrid KV cache manager off (kvbm does not support
  # it); NIXL refuses to pair workers that differ there, so decode workers match.
  i=0
  for gpu in "${prefill_gpus[@]}"; do
    start_worker "prefill$i" prefill "$gpu" $((PREFILL_PORT_BASE + i)) \
      --disable-hybrid-kv-cache-manager "${PREFILL_EXTRA[@]}"
    router+=(--prefill "http://$WORKER_HOST:$((PREFILL_PORT_BASE + i))")
    i=$((i + 1))
  done
  i=0
  for gpu in "${decode_gpus[@]}"; do
    start_worker "decode$i" decode "$gpu" $((DECODE_PORT_BASE + i)) \
      --disable-hybrid-kv-cache-manager "${DECODE_EXTRA[@]}"
    router+=(--decode "http://$WORKER_HOST:$((DECODE_PORT_BASE + i))")
    i=$((i + 1))
  done
  start router "${router[@]}" "${ROUTER_EXTRA[@]}"
  log "${#prefill_gpus[@]} prefill + ${#decode_gpus[@]} decode worker(s) of $MODEL; OpenAI API at http://$HTTP_HOST:$HTTP_PORT/v1 once /health answers 200"
  wait_any
}

# wait_any: block until a process exits, then stop the rest (EXIT trap); with
# STOP_ON_WORKER_EXIT=0 only the router's exit does.
wait_any() {
  local status i running reported=()
  while true; do
    status=0
    wait -n || status=$?
    running=0
    for i in "${!PIDS[@]}"; do
      if kill -0 "${PIDS[$i]}" 2>/dev/null; then
        running=$((running + 1))
        continue
      fi
      [ -n "${reported[$i]:-}" ] && continue
      reported[i]=1
      log "${NAMES[$i]} (pid ${PIDS[$i]}) exited with status $status"
      if [ "$STOP_ON_WORKER_EXIT" = 1 ] || [ "${NAMES[$i]}" = router ] || [ "${NAMES[$i]}" = agg ] \
          || [ "${NAMES[$i]}" = frontend ]; then
        log "stopping everything"
        exit "$status"
      fi
    done
    if [ "$running" -eq 0 ]; then
      exit "$status"
    fi
  done
}
