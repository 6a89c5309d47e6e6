#!/usr/bin/env bash
# Run HERE (not on the device): fetch MLX's CUDA wheels for the lent NVIDIA machine into .whl/ (ignored by
# git) and split the 86 MiB mlx-cuda-13 wheel in two, since one device call carries at most 64 MiB.
# See benchmarks/README.md, "GPU (CUDA)", for the two calls that follow.
set -euo pipefail
cd "$(dirname "$0")/../.."
MLX_VERSION=${MLX_VERSION:-0.32.4}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux_2_35_x86_64 -d .whl "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION"
wheel=$(ls .whl/mlx_cuda_13-"$MLX_VERSION"-*.whl)
half=$(( ($(stat -c %s "$wheel") + 1) / 2 ))
split -b "$half" -d -a 1 "$wheel" .whl/mlx_cuda_13.whl.part-
mv .whl/mlx_cuda_13.whl.part-0 .whl/mlx_cuda_13.whl.part-a
mv .whl/mlx_cuda_13.whl.part-1 .whl/mlx_cuda_13.whl.part-b
(cd .whl && sha256sum "$(basename "$wheel")" > SHA256SUMS)
mkdir -p .whl/b
mv .whl/mlx_cuda_13.whl.part-b .whl/SHA256SUMS .whl/b/
cp .whl/mlx-"$MLX_VERSION"-*.whl .whl/b/
rm "$wheel"
ls -la .whl .whl/b
