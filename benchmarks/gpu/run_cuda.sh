#!/usr/bin/env bash
# Runs ON the lent NVIDIA machine (device tool), in the repository root, in the second of two calls
# (benchmarks/README.md, "GPU (CUDA)"): joins the mlx-cuda-13 wheel, installs MLX 0.32.4 with --no-deps
# into /tmp/site beside the image's CUDA 13 libraries, then runs parity (MLX TF32 on and off) and speed
# (MLX and PyTorch on the GPU, both TF32 settings) and packs the results into $OUT.
# The image has torch 2.11 (CUDA 13), transformers 5.17, numpy 2, tokenizers, safetensors.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/mlx-clap-gpu-out}
PART_A=${PART_A:-/root/mlx-wheel/mlx_cuda_13.whl.part-a}
[ -f "$PART_A" ] || PART_A=.whl/mlx_cuda_13.whl.part-a  # still there when the machine stayed warm
RES=/tmp/mlx-clap-gpu-results
mkdir -p "$OUT" "$RES"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLX_CLAP_BENCH_CACHE=/tmp/mlx-clap-bench
export MLX_CLAP_BENCH_NOTE="device run: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
T0=$SECONDS

# 1. Join, verify and install the wheels; use the image's CUDA 13 libraries (nvidia-* packages of its torch).
wheel=.whl/b/$(awk '{print $2}' .whl/b/SHA256SUMS)
cat "$PART_A" .whl/b/mlx_cuda_13.whl.part-b > "$wheel" || exit 1
(cd .whl/b && sha256sum -c SHA256SUMS) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$wheel" .whl/b/mlx-0.32.4-*.whl || exit 1
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
ln -sfn "$SITE/nvidia" /tmp/site/nvidia
LD_LIBRARY_PATH="$(ls -d /tmp/site/nvidia/*/lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH PYTHONPATH="/tmp/site:$PWD"
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
echo "total: $((SECONDS - T0)) s"
tar -C "$RES" -czf "$OUT/results.tar.gz" .
ls -la "$RES"
