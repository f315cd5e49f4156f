#!/usr/bin/env bash
# GPU check for a lent CUDA machine (torch 2.11 + CUDA 13 there, no faiss, no network).
#
#   here:    bash benchmarks/gpu_check.sh --prepare        # fills .wheelhouse/ (ignored by git) with what the GPU box lacks
#   device:  bash benchmarks/gpu_check.sh OUT_DIR          # carry .wheelhouse; results land in OUT_DIR
#
# Runs the test suite on CUDA (the encoder's device=auto picks the GPU) and the indexing throughput
# benchmark against the naive loop, with GPU utilisation sampled by nvidia-smi. Finishes in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  rm -rf .wheelhouse && mkdir -p .wheelhouse
  # The GPU image (Python 3.12) has torch, transformers, pillow, pyarrow, click, tqdm, fsspec, anyio, h11,
  # scipy and pytest; it lacks faiss, sqlalchemy, fastapi (pydantic) , uvicorn, python-multipart and imagehash.
  # faiss-cpu (~30 MB) rather than a GPU build (hundreds of MB): the carry limit is
  # 64 MiB, so FAISS on the GPU is not exercised by this check; the encoder, pipeline and bf16 autocast are.
  pip download -q -d .wheelhouse --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --no-deps faiss-cpu sqlalchemy greenlet \
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions annotated-doc \
    uvicorn python-multipart imagehash pywavelets opentelemetry-api importlib-metadata
  ls .wheelhouse && du -sh .wheelhouse
  exit 0
fi

OUT="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
PY=$(command -v python3)
$PY -m pip install -q --no-index --no-deps .wheelhouse/*.whl 2>&1 | tail -3 || true
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 || true
$PY -c "import faiss, sqlalchemy, fastapi, imagehash, alignsearch.surfaces.cli; print('imports ok, faiss', faiss.__version__)" >> "$OUT/machine.txt" 2>&1 || true

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_util.csv" &
SMI=$!
ALIGNSEARCH_BENCH_CACHE=/tmp/bench timeout 300 $PY benchmarks/bench_index.py --images 512 --repeats 1 --device cuda --batch-size 256 \
  --precision fp32 --fast-decode --workers 15 \
  > "$OUT/bench_index.txt" 2>&1 || echo "benchmark failed: see bench_index.txt" >> "$OUT/machine.txt"
ALIGNSEARCH_BENCH_CACHE=/tmp/bench timeout 110 $PY -m pytest -q -x tests/test_model.py tests/test_cli.py tests/test_backend.py \
  > "$OUT/tests.txt" 2>&1 || echo "tests failed: see tests.txt" >> "$OUT/machine.txt"
kill $SMI || true
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
awk -F, '{gsub(/ %/,"",$1); s+=$1; n++} END {if (n) printf "mean GPU utilisation while running: %.0f%% over %d samples\n", s/n, n}' "$OUT/gpu_util.csv" >> "$OUT/machine.txt"
