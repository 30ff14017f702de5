#!/usr/bin/env bash
# Instructions per proxied request: the gateway under callgrind, deterministic
# where wall-clock CPU on a shared VM is not (docs/performance.md, fourth round).
#
#   scripts/instructions_per_request.sh [gateway serve flags...]
#   scripts/instructions_per_request.sh --policy round_robin
#   BODY_BYTES=100000 scripts/instructions_per_request.sh
#
# Starts 4 nginx replicas answering a fixed chat completion (and /health,
# /metrics, /v1/models), the gateway from this checkout under
# `valgrind --tool=callgrind --instr-atstart=no`, then counts instructions in
# two windows of the same length: idle (health checks, scrapes) and under
# `wrk -c16` POSTs of a small chat request. Prints (load - idle) / requests.
# User space only: the kernel's share of the reads and writes is not counted.
# Same commit, same count within about 1%; compare commits, not machines.
# Needs valgrind, nginx and wrk (apt-get install valgrind nginx-light wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SECS=${SECS:-4}
BASE=${BASE:-19901}
PORT=${PORT:-19950}
for tool in valgrind callgrind_control nginx wrk; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
run=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT

answer='{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hello from the replica."}}],"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}'
listens=""
replicas=()
for i in 0 1 2 3; do
  listens+="    listen 127.0.0.1:$((BASE + i));"$'\n'
  replicas+=(--replica "http://127.0.0.1:$((BASE + i))")
done
mkdir -p "$run/body"
cat > "$run/nginx.conf" <<EOF
worker_processes 1;
pid $run/nginx.pid;
daemon off;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $run/body;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  default_type application/json;
  server {
$listens
    location = /v1/chat/completions { return 200 '$answer'; }
    location = /health { return 200 '{"status":"ok"}'; }
    location = /v1/models { return 200 '{"object":"list","data":[{"id":"m","object":"model"}]}'; }
    location = /metrics { default_type text/plain; return 200 'vllm:num_requests_running{model_name="m"} 0\nvllm:num_requests_waiting{model_name="m"} 0\n'; }
  }
}
EOF
nginx -p "$run" -c "$run/nginx.conf" > "$run/nginx.log" 2>&1 &
pids+=($!)

prompt="Say hello in one word."
if [[ -n ${BODY_BYTES:-} ]]; then
  prompt=$(head -c "$BODY_BYTES" < /dev/zero | tr '\0' 'x')
fi
printf '{"model":"m","messages":[{"role":"user","content":"%s"}],"max_tokens":16,"stream":false}' \
  "$prompt" > "$run/body.json"
cat > "$run/post.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$run/body.json", "rb"); wrk.body = f:read("*a"); f:close()
EOF

out="$run/cg.out"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
  "$PY" -m router serve --port "$PORT" --admin-port $((PORT + 1)) "${replicas[@]}" "$@" \
  > "$run/gateway.log" 2>&1 &
gw=$!
pids+=("$gw")
for _ in $(seq 300); do
  curl -s -o /dev/null -X POST "127.0.0.1:$PORT/v1/chat/completions" \
    -H 'content-type: application/json' --data-binary @"$run/body.json" && break
  sleep 0.3
done
wrk -t1 -c16 -d2s -s "$run/post.lua" "http://127.0.0.1:$PORT" > /dev/null  # warm
status=$(curl -s -X POST "127.0.0.1:$PORT/v1/chat/completions" -o "$run/check.json" \
  -H "content-type: application/json" --data-binary @"$run/body.json" -w "%{http_code}")
if [[ $status != 200 ]]; then  # count only real proxied requests
  echo "the gateway answered $status: $(head -c 300 "$run/check.json")" >&2
  tail -5 "$run/nginx.log" "$run/gateway.log" >&2
  exit 1
fi

window() {  # window CMD...: instructions while CMD runs
  rm -f "$out".*
  callgrind_control -i on "$gw" > /dev/null 2>&1
  "$@"
  callgrind_control -i off "$gw" > /dev/null 2>&1
  callgrind_control -d "$gw" > /dev/null 2>&1
  grep -h "^totals:" "$out".* | awk '{s += $2} END {print s}'
}
idle=$(window sleep "$SECS")
requests_file="$run/requests"
load() {
  wrk -t1 -c16 -d"${SECS}s" -s "$run/post.lua" "http://127.0.0.1:$PORT" \
    | tee "$run/wrk.txt" | awk '/requests in/ {print $1}' > "$requests_file"
}
busy=$(window load)
n=$(cat "$requests_file")
if grep -qi "non-2xx" "$run/wrk.txt"; then
  grep -i "non-2xx" "$run/wrk.txt" >&2
  exit 1
fi
echo "requests=$n idle_instructions=$idle instructions_per_request=$(((busy - idle) / n))"
