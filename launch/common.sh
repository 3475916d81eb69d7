# Sourced by the launch scripts with their arguments: `[--dry-run] COMMAND [-- ARGS...]`
# becomes DRY, CMD and EXTRA, and `run` prints a command and runs it unless --dry-run.
# shellcheck shell=bash
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
CMD="${1:-}"; shift || true
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA=("$@")

run() {  # Print the command; run it unless --dry-run.
  printf '%q ' "$@"; echo
  if [[ $DRY -eq 0 ]]; then "$@"; fi
}
