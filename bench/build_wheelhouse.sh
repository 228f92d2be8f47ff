#!/usr/bin/env bash
# Build the wheelhouse the GPU check carries (bench/gpu_wheelhouse.py; BENCHMARKS.md, "GPU check"),
# here, with the project's environment active and PyPI reachable:
#   bench/build_wheelhouse.sh [DIR]       # default wheelhouse/ (ignored by git)
# It downloads the wheels of bench/gpu_requirements.txt for the GPU image's Python 3.12 on x86-64
# Linux, repacks Ray's without its Java jars and dashboard client, writes assets/ (the MiniLM tokenizer,
# the demo task's CSV files), then checks that every requirement is met by the wheelhouse or the image
# and that the wheelhouse and the working tree fit in the 64 MiB a device call carries: it exits
# non-zero naming what does not. About 100 MB to download and 2 minutes of recompression.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_wheelhouse build "${1:-wheelhouse}"
