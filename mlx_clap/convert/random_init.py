"""A random-init model in the converted-folder layout, to try every command offline (`mlx-clap random-model`).

The folder is what `mlx-clap convert` writes for a hub model: config.json (the real, full-size config of
the chosen architecture), model.safetensors, tokenizer files of roberta-base's size
(`convert.placeholder_tokenizer`) and manifest.json, whose `"random_weights": true` (with the seed and a
`source` that says "random init") marks it, so `mlx-clap info` and the embedding commands can say so.
Its vectors are finite unit vectors, distinct for distinct inputs, and mean nothing.

Values are realistic in scale: normal std 0.02 for embedding and relative-position tables and for biases
(transformers' `initializer_range`), linear and convolution weights normal with std 1/sqrt(fan-in) (0.036
at width 768; the fixed 0.02 makes narrow towers map every text to nearly one vector), LayerNorm weights
near 1, logit scales ln(1/0.07), and BatchNorm running statistics on the scale of log-mel dB for the input
BatchNorm, so no stage is an identity and distinct inputs give clearly distinct vectors.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig, FeatureConfig
from mlx_clap.io.folder import MANIFEST_NAME
from mlx_clap.version import __version__

CONVERTER = "mlx_clap.convert.random_init"
CONVERTER_VERSION = f"mlx-clap {__version__} ({CONVERTER} 1)"
SOURCE_FORMAT = "random-init"
INIT_STD = 0.02  # transformers' initializer_range for CLAP (both towers and the projections)


def _htsat_tiny(fused: bool = False) -> ClapConfig:
    # laion/clap-htsat-unfused and -fused: HTSAT-tiny (96, [2,2,6,2]) + roberta-base, the class defaults.
    audio = ClapAudioConfig(enable_fusion=fused, fusion_type="aff_2d" if fused else None)
    feature = FeatureConfig(truncation="fusion" if fused else "rand_trunc")
    return ClapConfig(audio_config=audio, text_config=ClapTextConfig(), feature_config=feature)


def _htsat_base() -> ClapConfig:
    # laion/larger_clap_*: HTSAT-base (docs/numerics.md §1.2), unfused.
    audio = ClapAudioConfig(patch_embeds_hidden_size=128, depths=(2, 2, 12, 2), hidden_size=1024)
    return ClapConfig(audio_config=audio, text_config=ClapTextConfig())


def _toy() -> ClapConfig:
    # Narrow towers (as the test fixtures), with the real frontend, 512-d output and roberta-base's
    # vocabulary: the same pipeline as a real model at a fraction of the cost, for CI and quick tries.
    audio = ClapAudioConfig(
        patch_embeds_hidden_size=16, depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 4, 8), hidden_size=128
    )
    text = ClapTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return ClapConfig(audio_config=audio, text_config=text)


# --arch name -> (config builder, the released models it has the shape of)
ARCHITECTURES: dict[str, tuple[Callable[[], ClapConfig], str]] = {
    "htsat-tiny": (_htsat_tiny, "laion/clap-htsat-unfused"),
    "htsat-tiny-fused": (lambda: _htsat_tiny(fused=True), "laion/clap-htsat-fused"),
    "htsat-base": (_htsat_base, "laion/larger_clap_general, _music, _music_and_speech"),
    "toy": (_toy, "no released model: small towers for tests and CI"),
}


def random_source(arch: str, seed: int) -> str:
    """The `source` recorded in config.json and manifest.json: says plainly that it is no trained model."""
    return f"random init (mlx-clap random-model --arch {arch} --seed {seed}): NOT a trained model"


def architecture_config(arch: str, seed: int = 0) -> ClapConfig:
    """The full `ClapConfig` of `arch` (one of `ARCHITECTURES`), its `source` naming the random init."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    config = ARCHITECTURES[arch][0]()
    config.source = random_source(arch, seed)
    config.validate()
    return config


def random_weights(config: ClapConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every parameter of `ClapModel(config)` as float32 numpy, drawn from numpy's PCG64 with `seed`.

    Tensors are drawn in sorted name order, so a seed gives the same weights on every machine. The
    module type of each tensor (read off the MLX model, whose arrays are never computed) picks its law.
    """
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_clap.models.clap import ClapModel

    model = ClapModel(config)
    owner: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in model.named_modules():
        for leaf, value in module.items():
            if isinstance(value, mx.array):
                owner[f"{prefix}.{leaf}" if prefix else leaf] = (module, leaf)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(ClapModel.parameter_shapes(config).items()):
        module, leaf = owner[name]
        out[name] = _draw(rng, name, module, leaf, shape, config)
    return out


def _draw(
    rng: np.random.Generator, name: str, module: Any, leaf: str, shape: tuple, config: ClapConfig
) -> np.ndarray:
    import mlx.nn as nn

    def normal(std: float, mean: float = 0.0) -> np.ndarray:
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(std)
        if mean:
            arr += np.float32(mean)
        return arr

    if leaf.startswith("logit_scale"):
        return np.asarray(math.log(config.logit_scale_init_value), dtype=np.float32).reshape(shape)
    if isinstance(module, nn.BatchNorm) and leaf in ("running_mean", "running_var"):
        if name.startswith("audio_model.audio_encoder.batch_norm."):
            # The input BatchNorm sees log-mel dB per mel band: centre it near -35 dB, spread 10-20 dB,
            # so typical audio comes out near unit scale as with trained statistics.
            if leaf == "running_mean":
                return rng.uniform(-50.0, -20.0, shape).astype(np.float32)
            return (rng.uniform(10.0, 20.0, shape) ** 2).astype(np.float32)
        if leaf == "running_mean":  # the fusion block's BatchNorms see activations
            return normal(0.5)
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if isinstance(module, (nn.LayerNorm, nn.BatchNorm)):
        return normal(INIT_STD, mean=1.0) if leaf == "weight" else normal(INIT_STD)
    if leaf == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
        # Scaled by fan-in (as tests/reference_models.py randomizes references): keeps every layer's output
        # near unit scale at any width, so narrow towers (--arch toy) do not collapse to one vector.
        return normal(1.0 / math.sqrt(max(int(np.prod(shape[1:])), 1)))
    return normal(INIT_STD)  # biases, embedding tables, relative-position tables


def write_random_model(dest: str | Path, arch: str = "htsat-tiny", seed: int = 0) -> Path:
    """Write a random-init model of `arch` as a converted folder at `dest` (replaced only if ours).

    Returns `dest`. Needs only the runtime dependencies (no torch, no transformers, no download).
    """
    from mlx_clap.convert.output import provenance_manifest, save_clap_folder
    from mlx_clap.convert.placeholder_tokenizer import write_placeholder_tokenizer

    config = architecture_config(arch, seed)
    weights = random_weights(config, seed)
    manifest = provenance_manifest(
        CONVERTER,
        CONVERTER_VERSION,
        config.source,
        SOURCE_FORMAT,
        [],
        random_weights=True,
        seed=seed,
        architecture=arch,
        shaped_like=ARCHITECTURES[arch][1],
    )
    with tempfile.TemporaryDirectory(prefix="mlx-clap-tokenizer-") as tok_dir:
        write_placeholder_tokenizer(tok_dir, config.text_config.vocab_size)
        return save_clap_folder(dest, config, weights, manifest, tokenizer_dir=Path(tok_dir))


def has_random_weights(folder: str | Path | None) -> bool:
    """Whether `folder`'s manifest.json marks its weights as random (False when there is none)."""
    if folder is None:
        return False
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("random_weights") is True


__all__ = [
    "ARCHITECTURES",
    "architecture_config",
    "has_random_weights",
    "random_source",
    "random_weights",
    "write_random_model",
]
