#!/usr/bin/env bash
# Smoke test of the deployment, as a user would run it: build the image, run it, talk to it; then the compose
# stack with Redis and Prometheus (and Grafana where its image exists), then two replicas behind one address.
#
#   deploy/smoke.sh            # needs Docker with BuildKit and docker compose (or docker-compose 1.29)
#   make smoke                 # the same
#
# Here (no registry): ../shared/tools/docker-sandbox.sh starts a Docker engine with stand-in base images;
# then DOCKER=/usr/bin/docker deploy/smoke.sh (its 20.10 client has BuildKit built in).
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
PY=${PY:-.venv/bin/python}
IMAGE=${IMAGE:-lstm-serve:latest}
PROJECT=lstm-smoke
if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose -p "$PROJECT"); else COMPOSE=($DOCKER compose -p "$PROJECT"); fi
export DOCKER_BUILDKIT=1
[[ -x $PY ]] || { echo "run 'make install-dev' first (the checks run with $PY)"; exit 1; }

step() { printf '\n== %s\n' "$*"; }
cleanup() {
  $DOCKER rm -f lstm-smoke-single >/dev/null 2>&1 || true
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_healthy() {  # container id, seconds
  for _ in $(seq "$2"); do
    state=$($DOCKER inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null || echo missing)
    [[ $state == healthy ]] && return 0
    sleep 1
  done
  echo "FAIL $1 is $state"; $DOCKER logs "$1" | tail -20; return 1
}

step "build $IMAGE (BuildKit: the train stage is skipped)"
$DOCKER build --network host -t "$IMAGE" .
size=$($DOCKER image inspect -f '{{.Size}}' "$IMAGE")
echo "ok   image size $((size / 1000000)) MB"

step "run the image alone"
$DOCKER run -d --name lstm-smoke-single -p 127.0.0.1:18000:8000 -p 127.0.0.1:18051:50051 "$IMAGE" >/dev/null
wait_healthy lstm-smoke-single 60 && echo "ok   HEALTHCHECK (readiness) is healthy"
uid=$($DOCKER exec lstm-smoke-single id -u)
[[ $uid != 0 ]] && echo "ok   runs as uid $uid (not root)" || { echo "FAIL runs as root"; exit 1; }
if $DOCKER exec lstm-smoke-single python -c "import torch" 2>/dev/null; then echo "FAIL torch is in the image"; exit 1; fi
echo "ok   no torch in the serving image"
$PY deploy/smoke_check.py --rest http://127.0.0.1:18000 --grpc 127.0.0.1:18051
$DOCKER stop -t 20 lstm-smoke-single >/dev/null
code=$($DOCKER inspect -f '{{.State.ExitCode}}' lstm-smoke-single)
[[ $code == 0 ]] && echo "ok   SIGTERM: drained and exited 0" || { echo "FAIL exit code $code after SIGTERM"; exit 1; }
$DOCKER rm lstm-smoke-single >/dev/null

services=(lstm lb redis prometheus)
if $DOCKER image inspect grafana/grafana:11.3.0 >/dev/null 2>&1; then services+=(grafana); else
  echo "(no grafana/grafana image here: the stack runs without Grafana)"; fi
step "compose: ${services[*]}"
"${COMPOSE[@]}" up -d --no-build "${services[@]}"
wait_healthy "$("${COMPOSE[@]}" ps -q lstm)" 90
$PY deploy/smoke_check.py --rest http://127.0.0.1:8000 --grpc 127.0.0.1:50051 --prometheus http://127.0.0.1:9090

step "compose: --scale lstm=2 behind one address, sessions shared through Redis"
"${COMPOSE[@]}" up -d --no-build --no-recreate --scale lstm=2 "${services[@]}"
for id in $("${COMPOSE[@]}" ps -q lstm); do wait_healthy "$id" 90; done
$PY deploy/smoke_check.py --rest http://127.0.0.1:8000 --grpc 127.0.0.1:50051 --prometheus http://127.0.0.1:9090 \
  --replicas 2

step "smoke test passed"
