"""Convert a Hugging Face CLAP model folder (hub layout) into an mlx-clap converted folder.

Torch-free for `model.safetensors` (numpy only); `pytorch_model.bin` needs torch (optional extra).

    from mlx_clap.convert.hf import convert_hf_folder
    convert_hf_folder("clap-htsat-unfused/", "weights/clap-htsat-unfused")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import mlx_clap
from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig, FeatureConfig
from mlx_clap.io.folder import WeightsError, save_converted_arrays

from mlx_clap.convert.common import hf_state_to_mlx, read_safetensors, sha256_file, to_numpy, torch_state_dict

CONVERTER = "mlx_clap.convert.hf"
CONVERTER_VERSION = f"mlx-clap {mlx_clap.__version__} ({CONVERTER} 1)"


def feature_config_from_hf(preprocessor: dict[str, Any] | None, enable_fusion: bool) -> FeatureConfig:
    """The frontend settings: the hub `preprocessor_config.json` when present, else the LAION defaults.

    Without a preprocessor file the truncation follows the model: `fusion` for fused models,
    `rand_trunc` otherwise; 50-14000 Hz as every LAION checkpoint (not HF's class default fmin 0).
    """
    if preprocessor:
        return FeatureConfig.from_dict(preprocessor)
    return FeatureConfig(
        truncation="fusion" if enable_fusion else "rand_trunc", frequency_min=50.0, frequency_max=14000.0
    )


def config_from_hf(
    config_json: dict[str, Any], preprocessor: dict[str, Any] | None = None, source: str = ""
) -> ClapConfig:
    """A fully resolved `ClapConfig` from an HF `config.json` (unknown keys ignored)."""
    if not isinstance(config_json, dict) or config_json.get("model_type") != "clap":
        kind = config_json.get("model_type") if isinstance(config_json, dict) else type(config_json).__name__
        raise WeightsError(f"config.json has model_type {kind!r}; a CLAP model (model_type 'clap') is needed")
    audio = ClapAudioConfig.from_dict(config_json.get("audio_config"))
    text_raw = dict(config_json.get("text_config") or {})
    # Configs saved by transformers 4.x carry the generation default max_length=20 in every sub-config;
    # it is not the tokenizer length (ours: LAION's 77), so it must not override it.
    text_raw.pop("max_length", None)
    text = ClapTextConfig.from_dict(text_raw)
    top = {k: v for k, v in config_json.items() if k in ("projection_dim", "logit_scale_init_value")}
    config = ClapConfig.from_dict(top)
    config.audio_config, config.text_config = audio, text
    config.feature_config = feature_config_from_hf(preprocessor, audio.enable_fusion)
    config.family, config.source = "laion", source
    return config


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from exc


def read_hf_weights(folder: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    """The state dict of an HF folder as numpy, and the files it came from.

    Prefers model.safetensors (or a sharded index); falls back to pytorch_model.bin through torch.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        shards = sorted(set((_read_json(index) or {}).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index}: shard {f.name} is missing")
    elif (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        state = torch_state_dict(path, "pytorch_model.bin")
        return to_numpy(state), [path]
    else:
        raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin to convert")
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state, files


def convert_hf_folder(
    src: str | Path,
    dest: str | Path,
    *,
    source_name: str | None = None,
    revision: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Convert an HF CLAP folder into `dest` (replaced if it exists); returns `dest`.

    Tokenizer files are copied from `tokenizer_dir` when given, else from the source folder.
    """
    src = Path(src)
    if not src.is_dir():
        raise WeightsError(f"{src}: not a folder")
    cfg = _read_json(src / "config.json")
    if cfg is None:
        raise WeightsError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        config = config_from_hf(cfg, _read_json(src / "preprocessor_config.json"), source_name or str(src))
    except WeightsError as exc:
        raise WeightsError(f"{src / 'config.json'}: {exc}") from exc
    state, files = read_hf_weights(src)
    weights = hf_state_to_mlx(state)
    sources = [src / "config.json", *files]
    if (src / "preprocessor_config.json").is_file():
        sources.append(src / "preprocessor_config.json")
    manifest = {
        "converter": CONVERTER,
        "converter_version": CONVERTER_VERSION,
        "source": source_name or str(src),
        "source_format": "huggingface",
        "revision": revision,
        "source_files": {p.name: sha256_file(p) for p in sources},
    }
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else src
    return save_converted_arrays(Path(dest), config, weights, manifest, tokenizer_dir=tok)


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_clap.convert.hf SRC DEST`: the same as `mlx-clap convert` for a local folder."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Convert a Hugging Face CLAP folder to an mlx-clap folder")
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--revision", default=None, help="revision to record in the manifest")
    args = parser.parse_args(argv)
    try:
        out = convert_hf_folder(args.src, args.dest, revision=args.revision)
    except WeightsError as exc:
        sys.exit(f"error: {exc}")
    print(f"converted {args.src} -> {out}")


if __name__ == "__main__":
    main()
