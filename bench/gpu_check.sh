#!/usr/bin/env bash
# The prepared GPU check (python -m bench.gpu; BENCHMARKS.md, "GPU check"): on a lent GPU machine,
# which reaches no network, install the carried wheelhouse/ (bench/build_wheelhouse.sh) and run
# every part within 8 minutes; the JSON, the Markdown snippet and the log go to $OUT (or --out DIR).
#   bench/gpu_check.sh                    # on the GPU machine, from the repository root
#   bench/gpu_check.sh --cpu-rehearsal    # the same script on a CPU (this environment's packages;
#                                         # WHEELHOUSE=DIR installs one here too, for this Python)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

rehearsal=0
for arg in "$@"; do
    [ "$arg" = "--cpu-rehearsal" ] && rehearsal=1
done
# The built wheelhouse is for the GPU image's Python (3.12): a rehearsal uses it only when told to.
wheelhouse="${WHEELHOUSE:-}"
if [ -z "$wheelhouse" ] && [ "$rehearsal" = 0 ] && [ -d wheelhouse ]; then
    wheelhouse=wheelhouse
fi
args=()
[ -n "$wheelhouse" ] && args=(--wheelhouse "$wheelhouse")
exec "${PYTHON:-python3}" -m bench.gpu ${args[@]+"${args[@]}"} "$@"
