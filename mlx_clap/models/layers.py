"""Small pieces shared by the towers: float32 LayerNorm and the L2 normalization of embeddings."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def layer_norm(norm: nn.LayerNorm, x: mx.array) -> mx.array:
    """LayerNorm computed in float32 whatever the model dtype, cast back, so half-precision models keep
    precise statistics."""
    out = mx.fast.layer_norm(
        x.astype(mx.float32), norm.weight.astype(mx.float32), norm.bias.astype(mx.float32), norm.eps
    )
    return out.astype(x.dtype)


def l2_normalize(x: mx.array, eps: float = 1e-12) -> mx.array:
    """x / max(||x||, eps) along the last axis, in float32 (as torch.nn.functional.normalize)."""
    x32 = x.astype(mx.float32)
    norm = mx.sqrt(mx.sum(x32 * x32, axis=-1, keepdims=True))
    return x32 / mx.maximum(norm, eps)


__all__ = ["l2_normalize", "layer_norm"]
