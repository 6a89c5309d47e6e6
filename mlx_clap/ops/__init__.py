"""Backend choice: the CPU-only fast paths (kernels, worker threads, BLAS, malloc) and the one predicate
that turns them on (`device.cpu_fast_paths`). Metal and CUDA run none of this."""
