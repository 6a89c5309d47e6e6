"""Convert a Hugging Face PE-Audio folder (`PeAudioModel` / `PeAudioFrameLevelModel`) into a converted folder.

A Hugging Face folder with `model.safetensors` also loads in place (`mlx_clap.load`); converting writes
the MLX layout once (float32, `PeAudioModel.sanitize` applied), the resolved config and the provenance
manifest (source, revision, sha256 of every source and written file). Torch-free for safetensors;
`pytorch_model.bin` needs torch (the `convert` extra).

    python -m mlx_clap.convert.pe_audio pe-a-frame-base/ weights/pe-a-frame-base
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_clap.convert.hf import hf_manifest, open_hf_source, read_hf_mlx_weights
from mlx_clap.io.folder import WeightsError, save_converted_arrays
from mlx_clap.models.pe_audio.model import PeAudioModel, read_pe_audio_config
from mlx_clap.version import __version__

CONVERTER = "mlx_clap.convert.pe_audio"
CONVERTER_VERSION = f"mlx-clap {__version__} ({CONVERTER} 1)"
# What the registry and the manifest say about released checkpoints: the architecture is checked against
# transformers on random weights; no released weights could be compared here.
VERIFICATION = "architecture parity-tested, released weights not verified"


# The two halves of a weight-normalized convolution, folded together by `PeAudioModel.sanitize`.
_WEIGHT_NORM = (
    ".weight_g",
    ".weight_v",
    ".parametrizations.weight.original0",
    ".parametrizations.weight.original1",
)


def sanitized_numpy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers PE-Audio state dict (numpy) -> MLX parameters (numpy float32, C order).

    Tensor by tensor (weight-norm halves by pair), so that besides the source only the output is held:
    about twice the checkpoint's size, not four times.
    """
    import mlx.core as mx

    groups: dict[str, list[str]] = {}
    for key in state:
        base = next((key[: -len(s)] for s in _WEIGHT_NORM if key.endswith(s)), key)
        groups.setdefault(base, []).append(key)
    out = {}
    for keys in groups.values():
        for name, value in PeAudioModel.sanitize({k: mx.array(np.asarray(state[k])) for k in keys}).items():
            arr = np.array(value.astype(mx.float32))
            out[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    return out


def convert_pe_audio_folder(
    src: str | Path,
    dest: str | Path,
    *,
    source_name: str | None = None,
    revision: str | None = None,
    tokenizer_dir: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a Hugging Face `pe_audio` folder into `dest` (replaced only if it is our own output).

    The tokenizer.json (from `tokenizer_dir`, else the source folder) must fit the text tower, else
    WeightsError; a source without one converts without it (the manifest says so). The audio-video and
    video checkpoints are refused with what is supported (`UnsupportedPeCheckpoint`).
    """
    src, tok = open_hf_source(src, tokenizer_dir)
    config, converted = read_pe_audio_config(src)
    if converted:
        raise WeightsError(
            f"{src}: this folder is already converted (an mlx-clap PE-Audio folder); use it directly"
        )
    config.source = source_name or str(src)
    _check_tokenizer(tok, config)
    weights, files = read_hf_mlx_weights(src, sanitized_numpy, trust_pickle=trust_pickle)
    manifest = hf_manifest(
        CONVERTER,
        CONVERTER_VERSION,
        config.source,
        src,
        files,
        revision=revision,
        architecture=config.architecture,
        verification=VERIFICATION,
    )
    return save_converted_arrays(
        Path(dest),
        config,
        weights,
        manifest,
        tokenizer_dir=tok if (Path(tok) / "tokenizer.json").is_file() else None,
        expected=PeAudioModel.parameter_shapes(config),
    )


def _check_tokenizer(folder: Path, config) -> None:
    """Refuse a tokenizer.json that does not fit the text tower (here, not at the first text embedding)."""
    from mlx_clap.preprocess.pe_audio_tokenizer import load_pe_audio_tokenizer
    from mlx_clap.preprocess.tokenizer import TokenizerError

    try:
        load_pe_audio_tokenizer(folder, config.text_config)
    except TokenizerError as exc:
        raise WeightsError(f"{folder}: the tokenizer does not fit this model: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_clap.convert.pe_audio SRC DEST`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face PE-Audio folder to an mlx-clap folder"
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--revision", default=None, help="revision to record in the manifest")
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with the tokenizer.json to use")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of a .bin (can run code): trusted files only",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_pe_audio_folder(
            args.src,
            args.dest,
            revision=args.revision,
            tokenizer_dir=args.tokenizer,
            trust_pickle=args.trust_pickle,
        )
    except WeightsError as exc:
        sys.exit(f"error: {exc}")
    print(f"converted {args.src} -> {out}")


if __name__ == "__main__":
    main()


__all__ = ["CONVERTER", "VERIFICATION", "convert_pe_audio_folder", "sanitized_numpy"]
