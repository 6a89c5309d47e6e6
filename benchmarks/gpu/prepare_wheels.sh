#!/usr/bin/env bash
# Download MLX's CUDA 13 wheels (mlx + mlx-cuda-13, Linux x86-64, Python 3.12) into .whl/b/ (ignored by
# git), for a CUDA machine that cannot reach PyPI: run this where pip works, copy the clone over, then run
# benchmarks/gpu/run_cuda.sh there. Not needed when MLX's CUDA build is already installed on that machine.
#
#   MLX_VERSION=0.32.4 bash benchmarks/gpu/prepare_wheels.sh
#   SPLIT=1 bash benchmarks/gpu/prepare_wheels.sh   # also cut the ~86 MiB CUDA wheel into two halves
#                                                    # (.whl/mlx_cuda_13.whl.part-a, .whl/b/...part-b)
#                                                    # for copies limited in file size; run_cuda.sh joins them
set -euo pipefail
cd "$(dirname "$0")/../.."
MLX_VERSION=${MLX_VERSION:-0.32.4}
mkdir -p .whl/b
python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux_2_35_x86_64 -d .whl/b "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION"
wheel=$(ls .whl/b/mlx_cuda_13-"$MLX_VERSION"-*.whl)
# The checksum of the whole CUDA wheel; run_cuda.sh verifies it before installing.
(cd .whl/b && sha256sum "$(basename "$wheel")" > SHA256SUMS)
if [ "${SPLIT:-0}" = 1 ]; then
  half=$(( ($(stat -c %s "$wheel") + 1) / 2 ))
  split -b "$half" -d -a 1 "$wheel" .whl/mlx_cuda_13.whl.part-
  mv .whl/mlx_cuda_13.whl.part-0 .whl/mlx_cuda_13.whl.part-a
  mv .whl/mlx_cuda_13.whl.part-1 .whl/b/mlx_cuda_13.whl.part-b
  rm "$wheel"
fi
ls -la .whl .whl/b
