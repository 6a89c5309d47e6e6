#!/usr/bin/env bash
# Parity and speed of mlx-clap on an NVIDIA GPU (MLX's CUDA backend), run in the repository root of a clone:
#
#   bash benchmarks/gpu/run_cuda.sh
#
# Needs Linux x86-64 (glibc >= 2.35), an NVIDIA driver >= 580 (CUDA 13), Python 3.12 with this package's
# dependencies, a CUDA build of PyTorch (its nvidia-* packages provide the CUDA 13 libraries), transformers,
# tokenizers and safetensors. MLX: the installed one if it already runs on the GPU (`pip install
# "mlx[cuda13]"`); otherwise the wheels that benchmarks/gpu/prepare_wheels.sh put in .whl/, installed with
# --no-deps into /tmp/site next to PyTorch's CUDA libraries. Then: parity (the reference in float32 on the
# CPU, MLX on the GPU, with MLX's TF32 on and off) and speed (MLX and PyTorch on the GPU, TF32 on for both,
# then off for both). $OUT (default /tmp/mlx-clap-gpu-out) receives log.txt and results.tar.gz.
# See benchmarks/README.md, "GPU (CUDA)".
set -uo pipefail
cd "$(dirname "$0")/../.."
MLX_VERSION=${MLX_VERSION:-0.32.4}
OUT=${OUT:-/tmp/mlx-clap-gpu-out}
PART_A=${PART_A:-.whl/mlx_cuda_13.whl.part-a}  # only used when prepare_wheels.sh ran with SPLIT=1
RES=/tmp/mlx-clap-gpu-results
mkdir -p "$OUT" "$RES"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLX_CLAP_BENCH_CACHE=/tmp/mlx-clap-bench
export MLX_CLAP_BENCH_NOTE="CUDA run: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
T0=$SECONDS

# 1. MLX on the GPU: the installed one, or the downloaded wheels beside PyTorch's CUDA 13 libraries.
if python3 -c 'import sys, mlx.core as mx; sys.exit(0 if mx.default_device() == mx.gpu else 1)' 2>/dev/null; then
  echo "using the installed MLX (default device: GPU)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  [ -f .whl/b/SHA256SUMS ] || { echo "no GPU-enabled MLX installed and no wheels in .whl/b (run prepare_wheels.sh)"; exit 1; }
  wheel=.whl/b/$(awk '{print $2}' .whl/b/SHA256SUMS)
  if [ ! -f "$wheel" ]; then  # the wheel came in two halves (prepare_wheels.sh with SPLIT=1)
    cat "$PART_A" .whl/b/mlx_cuda_13.whl.part-b > "$wheel" || exit 1
  fi
  (cd .whl/b && sha256sum -c SHA256SUMS) || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheel" .whl/b/mlx-"$MLX_VERSION"-*.whl || exit 1
  SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  ln -sfn "$SITE/nvidia" /tmp/site/nvidia
  LD_LIBRARY_PATH="$(ls -d /tmp/site/nvidia/*/lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH PYTHONPATH="/tmp/site:$PWD"
fi
# MLX's CUDA JIT (NVRTC) includes $CUDA_HOME/include, else /usr/local/cuda/include.
if [ -z "${CUDA_HOME:-}" ] && [ ! -d /usr/local/cuda ]; then
  if command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
  elif [ -d /tmp/site/nvidia/cu13/include ]; then export CUDA_HOME=/tmp/site/nvidia/cu13; fi
fi
echo "CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}"
python3 - <<'PY' || exit 1
import mlx.core as mx
a = mx.random.normal((512, 512))
print("mlx", mx.__version__, mx.default_device(), "matmul ok:", float((a @ a.T).sum()) != 0)
PY
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv
echo "setup: $((SECONDS - T0)) s"

# 2. Parity: reference = float32 PyTorch on the CPU; MLX on the GPU with its default TF32, then without.
MLX_ENABLE_TF32=1 timeout 120 python3 benchmarks/parity.py --quick --families htsat-tiny htsat-tiny-fused text \
  --dtypes float32 bfloat16 float16 --tag cuda-tf32 --out "$RES"
MLX_ENABLE_TF32=0 timeout 60 python3 benchmarks/parity.py --quick --families htsat-tiny text \
  --dtypes float32 --tag cuda-fp32 --out "$RES"
echo "parity: $((SECONDS - T0)) s"

# 3. Speed: both sides on the GPU. TF32 on for both (each framework's fast float32), then off for both.
#    The frontend parts run HF's numpy extractor on the host, so they stop at batch 64.
MLX_ENABLE_TF32=1 timeout 150 python3 benchmarks/speed.py --torch-device cuda --tf32 on --parts audio text stages \
  --dtypes float32 bfloat16 --batches 1 8 64 256 --repeats 10 --max-seconds 8 --stage-batch 64 \
  --tag cuda-tf32 --out "$RES"
MLX_ENABLE_TF32=1 timeout 75 python3 benchmarks/speed.py --torch-device cuda --tf32 on --parts mel e2e \
  --dtypes float32 --batches 1 8 64 --repeats 5 --max-seconds 8 --tag cuda-tf32-frontend --out "$RES"
MLX_ENABLE_TF32=0 timeout 60 python3 benchmarks/speed.py --torch-device cuda --tf32 off --parts audio text \
  --dtypes float32 --batches 8 64 256 --repeats 10 --max-seconds 8 --tag cuda-fp32 --out "$RES"
echo "CLAP: $((SECONDS - T0)) s"

# 4. PE-Audio (full size, random weights; building its hub folder takes a minute or two): 10-s, 60-s and
#    10-min clips, frames, text, and the memory of a streamed 2-hour file, MLX and PyTorch on the GPU.
#    PE_AUDIO=0 skips it; whatever finished within the timeout is kept.
if [ "${PE_AUDIO:-1}" = 1 ]; then
  MLX_ENABLE_TF32=1 timeout "${PE_AUDIO_TIMEOUT:-420}" python3 benchmarks/bench_pe_audio.py --device gpu \
    --torch-device cuda --clips 10 60 600 --torch-max-seconds 60 --repeats 3 --memory-short-seconds 600 \
    --memory-seconds 7200 --tag cuda --out "$RES"
fi
echo "total: $((SECONDS - T0)) s"
tar -C "$RES" -czf "$OUT/results.tar.gz" .
ls -la "$RES"
