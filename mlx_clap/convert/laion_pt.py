"""Convert an original LAION-CLAP `.pt` checkpoint into an mlx-clap converted folder.

The checkpoint is a torch pickle (`{"state_dict": ...}` with a `module.` prefix), so this needs torch.
Keys are renamed as the HF conversion script does (docs/numerics.md §6.2), qkv is split into query/key/value,
and the architecture (HTSAT tiny/base, fusion, text tower size) is read off the tensor shapes.

    from mlx_clap.convert.laion_pt import convert_laion_pt
    convert_laion_pt("630k-audioset-best.pt", "weights/630k-audioset-best")
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from mlx_clap.config import ClapAudioConfig, ClapConfig, ClapTextConfig, FeatureConfig
from mlx_clap.convert.common import hf_state_to_mlx, require_tokenizer_files, to_numpy, torch_state_dict
from mlx_clap.convert.output import provenance_manifest, save_clap_folder
from mlx_clap.io.folder import WeightsError
from mlx_clap.version import __version__

log = logging.getLogger(__name__)

CONVERTER = "mlx_clap.convert.laion_pt"
CONVERTER_VERSION = f"mlx-clap {__version__} ({CONVERTER} 1)"

# Substring renames of `convert_clap_original_pytorch_to_hf.py`, applied in this order.
RENAMES = (
    ("text_branch", "text_model"),
    ("audio_branch", "audio_model.audio_encoder"),
    ("attn", "attention.self"),
    ("self.proj", "output.dense"),
    ("attention.self_mask", "attn_mask"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("bn0", "batch_norm"),
)
# Parts of the LAION model that CLAP inference never uses (frontend kernels, AudioSet heads, training MLPs).
UNUSED_PREFIXES = (
    "audio_branch.spectrogram_extractor.",
    "audio_branch.logmel_extractor.",
    "audio_branch.tscam_conv.",
    "audio_branch.head.",
    "audio_transform.",
    "text_transform.",
)
# RoBERTa's attention head size; the head count is not stored in the tensors.
ROBERTA_HEAD_DIM = 64


def laion_state_to_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LAION `CLAP` state dict (prefix already stripped) -> HF `ClapModel` names, qkv split."""
    out = {}
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        new = key
        for old, repl in RENAMES:
            new = new.replace(old, repl)
        new = re.sub(r"^(audio|text)_projection\.0\.", r"\1_projection.linear1.", new)
        new = re.sub(r"^(audio|text)_projection\.2\.", r"\1_projection.linear2.", new)
        if ".qkv." in new:
            q, k, v = np.split(np.asarray(value), 3, axis=0)
            for part, arr in (("query", q), ("key", k), ("value", v)):
                out[new.replace(".qkv.", f".{part}.")] = arr
            continue
        out[new] = value
    return out


def _count(state: dict, pattern: str) -> int:
    """1 + the largest index captured by `pattern` among the keys (0 if none matches)."""
    found = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


def config_from_laion_state(state: dict[str, np.ndarray], source: str = "") -> ClapConfig:
    """Infer the `ClapConfig` of an HF-named LAION state dict from its tensor shapes."""
    enc = "audio_model.audio_encoder."
    try:
        proj = state[enc + "patch_embed.proj.weight"]  # (embed, in, k, k), OIHW
        n_stages = _count(state, re.escape(enc) + r"layers\.(\d+)\.")
        depths = [_count(state, re.escape(enc) + rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(n_stages)]
        heads = [
            int(state[enc + f"layers.{i}.blocks.0.attention.self.relative_position_bias_table"].shape[1])
            for i in range(n_stages)
        ]
        table_rows = int(
            state[enc + "layers.0.blocks.0.attention.self.relative_position_bias_table"].shape[0]
        )
        window = (int(round(np.sqrt(table_rows))) + 1) // 2
        fused = enc + "patch_embed.mel_conv2d.weight" in state
        audio = ClapAudioConfig(
            window_size=window,
            num_mel_bins=int(state[enc + "batch_norm.weight"].shape[0]),
            patch_size=int(proj.shape[2]),
            patch_stride=(int(proj.shape[2]), int(proj.shape[3])),
            patch_embeds_hidden_size=int(proj.shape[0]),
            patch_embed_input_channels=int(proj.shape[1]),
            depths=tuple(depths),
            num_attention_heads=tuple(heads),
            hidden_size=int(state["audio_projection.linear1.weight"].shape[1]),
            projection_dim=int(state["audio_projection.linear2.weight"].shape[0]),
            enable_fusion=fused,
            fusion_type="aff_2d" if fused else None,
            enable_patch_layer_norm=enc + "patch_embed.norm.weight" in state,
        )
        words = state["text_model.embeddings.word_embeddings.weight"]
        hidden = int(words.shape[1])
        text = ClapTextConfig(
            vocab_size=int(words.shape[0]),
            hidden_size=hidden,
            num_hidden_layers=_count(state, r"text_model\.encoder\.layer\.(\d+)\."),
            num_attention_heads=max(1, hidden // ROBERTA_HEAD_DIM),
            intermediate_size=int(state["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            max_position_embeddings=int(state["text_model.embeddings.position_embeddings.weight"].shape[0]),
            type_vocab_size=int(state["text_model.embeddings.token_type_embeddings.weight"].shape[0]),
            # LAION builds its text tower from roberta-base's config, whose eps is 1e-5 (HF hub: 1e-12).
            layer_norm_eps=1e-5,
            projection_dim=int(state["text_projection.linear2.weight"].shape[0]),
        )
    except KeyError as exc:
        raise WeightsError(f"not a LAION-CLAP HTSAT/RoBERTa checkpoint: tensor {exc} is missing") from exc
    feature = FeatureConfig(
        truncation="fusion" if fused else "rand_trunc", frequency_min=50.0, frequency_max=14000.0
    )
    config = ClapConfig(
        audio_config=audio,
        text_config=text,
        feature_config=feature,
        projection_dim=audio.projection_dim,
        family="laion",
        source=source,
    )
    try:
        config.validate()  # sizes read off the tensors, checked before a model is built from them
    except ValueError as exc:
        raise WeightsError(f"the architecture read off the tensors is not a sane CLAP model: {exc}") from exc
    return config


def read_laion_state(path: Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """torch.load the checkpoint, take `state_dict`, strip `module.`, return numpy arrays.

    Read with torch's weights-only unpickler; released files that pickle more (numpy scalars, training
    arguments) need `trust_pickle=True` (see `torch_state_dict`).
    """
    ckpt = torch_state_dict(path, "LAION .pt", trust_pickle=trust_pickle)
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("model"), dict):
        raise WeightsError(
            f"{path}: this looks like a Microsoft msclap checkpoint ({{'model': ...}}), not LAION-CLAP; "
            "convert it with `mlx-clap convert --family msclap` (or `python -m mlx_clap.convert.msclap`)"
        )
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: no state_dict in the checkpoint (got {type(ckpt).__name__})")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    return to_numpy(state)


def convert_laion_pt(
    src: str | Path,
    dest: str | Path,
    *,
    source_name: str | None = None,
    tokenizer_dir: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a LAION `.pt` into `dest` (replaced if it exists); returns `dest`.

    `trust_pickle=True` lets a checkpoint that pickles more than tensors be read with the full
    unpickler, which can run code from the file: only for files from a trusted source.

    LAION checkpoints carry no tokenizer. Pass `tokenizer_dir` (a folder with roberta-base's
    tokenizer.json or vocab.json + merges.txt) to copy one in; otherwise the folder gets none (recorded
    in the manifest) and only audio embedding works.
    """
    src = Path(src)
    if not src.is_file():
        raise WeightsError(f"{src}: no such checkpoint file")
    # Before the checkpoint is read (slow): a tokenizer folder without tokenizer files is a mistake.
    tok = require_tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else None
    hf_state = laion_state_to_hf(read_laion_state(src, trust_pickle=trust_pickle))
    try:
        config = config_from_laion_state(hf_state, source_name or str(src))
        weights = hf_state_to_mlx(hf_state)
    except WeightsError as exc:
        raise WeightsError(f"{src}: {exc}") from exc
    notes = []
    if tokenizer_dir is None:
        log.warning(
            "%s: LAION checkpoints hold no tokenizer; the converted folder has none. Convert again with a "
            "tokenizer folder (roberta-base's tokenizer.json) to embed text.",
            src.name,
        )
        notes.append(
            "no tokenizer: LAION .pt checkpoints do not include one (roberta-base's is needed for text)"
        )
    manifest = provenance_manifest(
        CONVERTER, CONVERTER_VERSION, source_name or str(src), "laion-pt", [src], revision=None, notes=notes
    )
    return save_clap_folder(dest, config, weights, manifest, tokenizer_dir=tok)


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_clap.convert.laion_pt CHECKPOINT DEST`: what `mlx-clap convert CHECKPOINT DEST` does."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Convert a LAION-CLAP .pt checkpoint to an mlx-clap folder")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with roberta-base's tokenizer")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow full unpickling (can run code): trusted files only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert_laion_pt(
            args.checkpoint, args.dest, tokenizer_dir=args.tokenizer, trust_pickle=args.trust_pickle
        )
    except WeightsError as exc:
        sys.exit(f"error: {exc}")
    print(f"converted {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
