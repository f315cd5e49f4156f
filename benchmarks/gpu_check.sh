#!/usr/bin/env bash
# GPU check for a lent CUDA machine (torch 2.11 + CUDA 13 there, no faiss, no network).
#
#   here:    bash benchmarks/gpu_check.sh --prepare        # fills .wheelhouse/ (ignored by git) with what the GPU box lacks
#   device:  bash benchmarks/gpu_check.sh OUT_DIR          # carry .wheelhouse; results land in OUT_DIR
#   device:  bash benchmarks/gpu_check.sh --decode OUT_DIR # issue 29's GPU decode measurement (see that block)
#
# Runs the test suite on CUDA (the encoder's device=auto picks the GPU) and the indexing throughput
# benchmark against the naive loop, with GPU utilisation sampled by nvidia-smi. Finishes in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  rm -rf .wheelhouse && mkdir -p .wheelhouse
  # The GPU image (Python 3.12) has torch, transformers, pillow, pyarrow, click, tqdm, fsspec, anyio, h11,
  # scipy and pytest; it lacks faiss, sqlalchemy, fastapi (pydantic) , uvicorn, python-multipart, imagehash and
  # watchfiles (index --watch).
  # faiss-cpu (~30 MB) rather than a GPU build (hundreds of MB): the carry limit is
  # 64 MiB, so FAISS on the GPU is not exercised by this check; the encoder, pipeline and bf16 autocast are.
  "${PYTHON:-python3}" -m pip download -q -d .wheelhouse --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --no-deps faiss-cpu sqlalchemy greenlet \
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions annotated-doc \
    uvicorn python-multipart imagehash pywavelets opentelemetry-api importlib-metadata watchfiles
  # nvImageCodec, the GPU decode's other JPEG decoder (--decode measures it beside torchvision's nvJPEG), with the
  # nvJPEG runtime it loads: ~28 MB for CUDA 13 (the GPU image's torch); NVIMGCODEC_CUDA=12 takes the CUDA 12 pair.
  if [ "${NVIMGCODEC_CUDA:-13}" = 12 ]; then nvimg=(nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12); else
    nvimg=(nvidia-nvimgcodec-cu13 "nvidia-nvjpeg>=13,<14"); fi
  "${PYTHON:-python3}" -m pip download -q -d .wheelhouse --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --no-deps "${nvimg[@]}" || echo "nvImageCodec wheels not downloaded: --decode measures torchvision only"
  ls .wheelhouse && du -sh --apparent-size .wheelhouse
  size=$(du -sb .wheelhouse | cut -f1)
  [ "$size" -lt $((60 * 1024 * 1024)) ] || echo "WARNING: .wheelhouse is $((size / 1048576)) MiB; the carry limit is 64 MiB in all"
  exit 0
fi

if [ "${1:-}" = "--decode" ]; then
  # Issue 29, one run on the GPU machine (16 cores, one H200, no network), under 8.5 minutes at worst:
  #   device:  bash benchmarks/gpu_check.sh --decode "$OUT"            (carry .wheelhouse; run with timeout_s 540)
  #   here:    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --decode /tmp/out --smoke   (small, any machine)
  # 2,000 camera (12 MP) and 5,000 web (~1 MP) JPEGs made from scikit-image's photographs; for each, `index
  # --gpu-decode`, `index --no-gpu-decode` and the naive loop, the GPU decode stage alone, and the embeddings'
  # cosine through the GPU decode against the exact CPU decode (a real align-base if the machine has one, else
  # random weights, said so); GPU utilisation sampled throughout. Both JPEG decoders of the stage are measured
  # (index, the stage alone, parity): torchvision's nvJPEG, and nvImageCodec where the carried wheels install. Each part has its own time limit: one that
  # fails or overruns leaves the others' figures. Results: OUT/results.md, results-{camera,web}.json,
  # machine.txt, gpu_util.csv, log.txt, tests.txt.
  OUT="${2:?usage: gpu_check.sh --decode OUT_DIR [--smoke]}"
  SMOKE="${3:-}"
  mkdir -p "$OUT"
  set +e
  PY="${PYTHON:-python3}"
  note() { echo "[$(date +%T)] $*" | tee -a "$OUT/machine.txt"; }
  if ! "$PY" -c "import faiss, sqlalchemy, imagehash" 2>/dev/null; then
    wheels=$(ls .wheelhouse/*.whl 2>/dev/null | grep -iE '/(faiss_cpu|sqlalchemy|greenlet|imagehash|pywavelets)-')
    # --target: only these five, beside the image's own packages (none of them shadowed)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
      >> "$OUT/log.txt" 2>&1 || note "wheel install failed (run --prepare here and carry .wheelhouse)"
  fi
  if ! "$PY" -c "from nvidia import nvimgcodec" 2>/dev/null; then
    nvwheels=$(ls .wheelhouse/*.whl 2>/dev/null | grep -iE '/(nvidia_nvimgcodec|nvidia_nvjpeg)')
    if [ -n "$nvwheels" ]; then
      # their own folder: nvImageCodec finds libnvjpeg at nvidia/cu13/lib beside it (its RPATH); its nvidia/__init__.py
      # becomes a pkgutil namespace so the image's other nvidia.* packages still import through it
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-nvimgcodec \
        $nvwheels >> "$OUT/log.txt" 2>&1 \
        && echo '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' > /tmp/site-nvimgcodec/nvidia/__init__.py \
        || note "nvImageCodec install failed (see log.txt): its figures will say it is not available"
    fi
  fi
  export PYTHONPATH="$PWD:/tmp/site:/tmp/site-nvimgcodec${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  export ALIGNSEARCH_BENCH_CACHE="${ALIGNSEARCH_BENCH_CACHE:-/tmp/bench}"
  export ALIGNSEARCH_CACHE="$ALIGNSEARCH_BENCH_CACHE/export-cache"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/machine.txt" 2>&1
  "$PY" - >> "$OUT/machine.txt" 2>&1 <<'PYEOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "cores", os.cpu_count())
try:
    import torchvision
    print("torchvision", torchvision.__version__)
except Exception as exc:
    print("torchvision: not importable:", exc)
from indexer import gpudecode
for decoder in ("torchvision", "nvimgcodec"):
    print(f"GPU decode on cuda with {decoder}:", gpudecode.unavailable("cuda", decoder) or "works")
try:
    from nvidia import nvimgcodec
    print("nvImageCodec", nvimgcodec.__version__, "for CUDA", nvimgcodec.__cuda_version__)
except Exception as exc:
    print("nvImageCodec: not importable:", exc)
import faiss, sqlalchemy, imagehash, alignsearch.surfaces.cli
print("imports ok, faiss", faiss.__version__)
import sys; sys.path.insert(0, "benchmarks")
from bench_index import real_model
print("real align-base:", real_model() or "none on this machine (parity uses random weights)")
PYEOF
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
  SMI=$!
  DEV=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || DEV=cpu
  if [ "$SMOKE" = "--smoke" ]; then
    COMMON=(--gpu-decode --smoke --device "$DEV" --batch-size 8 --workers 1 --stage-timeout 120 --decoders auto,nvimgcodec)
    CAMERA=(--images 24 --naive-images 8 --parity 4); WEB=(--images 40 --naive-images 8 --parity 4 --skip-warm-up)
    LIMITS=(600 300 120)
  else
    COMMON=(--gpu-decode --device "$DEV" --batch-size 256 --workers 15 --stage-timeout 100
            --decoders torchvision,nvimgcodec)
    CAMERA=(--images 2000 --naive-images 64 --parity 16); WEB=(--images 5000 --naive-images 256 --parity 16 --skip-warm-up)
    LIMITS=(285 170 45)
  fi
  note "camera: ${CAMERA[*]} on $DEV"
  timeout "${LIMITS[0]}" "$PY" benchmarks/bench_index.py "${COMMON[@]}" --corpus camera "${CAMERA[@]}" --out "$OUT" \
    >> "$OUT/log.txt" 2>&1 || note "camera run ended with exit $? (see log.txt; results-camera.json holds what finished)"
  note "web: ${WEB[*]}"
  timeout "${LIMITS[1]}" "$PY" benchmarks/bench_index.py "${COMMON[@]}" --corpus web "${WEB[@]}" --out "$OUT" \
    >> "$OUT/log.txt" 2>&1 || note "web run ended with exit $? (see log.txt; results-web.json holds what finished)"
  note "the gpu-marked test"
  timeout "${LIMITS[2]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpudecode.py > "$OUT/tests.txt" 2>&1 \
    || note "gpu test exit $? (see tests.txt)"
  kill $SMI 2>/dev/null
  awk -F, '{gsub(/ %/,"",$2); s+=$2; n++} END {if (n) printf "mean GPU utilisation over the whole script: %.0f%% over %d samples\n", s/n, n}' \
    "$OUT/gpu_util.csv" >> "$OUT/machine.txt" 2>/dev/null
  note "done"
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
