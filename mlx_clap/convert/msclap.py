"""Convert a released msclap checkpoint (`CLAP_weights_2022.pth`, `CLAP_weights_2023.pth`) to a folder.

The files are torch pickles shaped `{'model': state_dict}` (docs/numerics.md §1.3, §6.3) that msclap loads
with `strict=False`, so a key the model lacks or a tensor the file lacks goes unnoticed there. Here every
key is accounted for: mapped, dropped on purpose (listed in the manifest with the reason), or reported.
Missing tensors are an error; unexpected ones are an error unless `allow_unexpected=True`.

Layout changes (docs/numerics.md §6.4): Conv2d OIHW -> OHWI; GPT-2 `Conv1D` (in, out) -> Linear (out, in);
HTSAT keys renamed from LAION's to HF's names with qkv split into query/key/value (as convert/laion_pt);
the filterbank moves to `audio_encoder.base.logmel_extractor.melW`; BatchNorm keeps running statistics.

The tokenizer is not in the checkpoint: msclap loads `gpt2` / `bert-base-uncased` from the hub. Pass a
folder with that model's tokenizer files (tokenizer.json, or vocab.json + merges.txt, or vocab.txt);
without one the hub cache is tried (offline-safe), and `tokenizer=False` converts the weights alone.

    python -m mlx_clap.convert.msclap CLAP_weights_2023.pth weights/msclap-2023 --tokenizer ~/gpt2
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clap.convert.common import sha256_file, to_numpy, torch_state_dict
from mlx_clap.convert.laion_pt import RENAMES as LAION_TO_HF_RENAMES
from mlx_clap.convert.output import provenance_manifest
from mlx_clap.dsp import periodic_hann, slaney_mel_filterbank
from mlx_clap.io.files import atomic_write_json, publish_folder
from mlx_clap.io.folder import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, WeightsError, check_replaceable
from mlx_clap.models.msclap.config import MsClapConfig
from mlx_clap.models.msclap.logmel import N_FFT
from mlx_clap.preprocess.msclap_tokenizer import GPT2_PAD, TOKENIZER_NAME
from mlx_clap.version import __version__

log = logging.getLogger(__name__)

CONVERTER = "mlx_clap.convert.msclap"
CONVERTER_VERSION = f"mlx-clap {__version__} ({CONVERTER} 1)"

HTSAT_PREFIX = "audio_encoder.base.htsat."
MEL_KEY = "audio_encoder.base.logmel_extractor.melW"

# (pattern, reason): tensors that are in the released files but not in the MLX model, on purpose.
DROPPED = (
    (r"\.num_batches_tracked$", "BatchNorm step counter (training only)"),
    (
        r"spectrogram_extractor\.stft\.conv_(real|imag)\.weight$",
        "STFT kernels: the MLX frontend uses an rfft",
    ),
    (r"^audio_encoder\.base\.fc_audioset\.", "Cnn14 AudioSet classifier: not used by embeddings"),
    (r"^audio_encoder\.base\.htsat\.(tscam_conv|head)\.", "HTSAT AudioSet heads: not used by embeddings"),
    (r"\.attn_mask$", "Swin shift mask: recomputed"),
    (r"\.relative_position_index$", "Swin relative index: recomputed"),
    (r"^caption_encoder\.base\.pooler\.", "BERT pooler: msclap pools the raw [CLS] state"),
    (r"^caption_encoder\.base\.embeddings\.(position_ids|token_type_ids)$", "transformers index buffers"),
    (
        r"^caption_encoder\.base\.h\.\d+\.attn\.(bias|masked_bias)$",
        "GPT-2 causal-mask buffers (old transformers)",
    ),
)
GPT2_CONV1D = re.compile(
    r"^caption_encoder\.base\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"
)
TOKENIZER_SOURCES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")


def detect_version(state: dict[str, Any]) -> str:
    """ "2023" (HTSAT + GPT-2) or "2022" (Cnn14 + BERT), from the keys."""
    keys = list(state)
    has_htsat = any(k.startswith(HTSAT_PREFIX) for k in keys)
    has_cnn = any(k.startswith("audio_encoder.base.conv_block1.") for k in keys)
    has_gpt2 = any(k.startswith("caption_encoder.base.h.") for k in keys)
    has_bert = any(k.startswith("caption_encoder.base.encoder.layer.") for k in keys)
    if any(k.startswith(("gpt.", "clap_project.")) for k in keys):
        raise WeightsError(
            "this is the clapcap (captioning) checkpoint; only the CLAP 2022/2023 models convert"
        )
    if has_htsat and has_gpt2:
        return "2023"
    if has_cnn and has_bert:
        return "2022"
    raise WeightsError(
        "not a msclap CLAP checkpoint: expected audio_encoder.base.{htsat.*|conv_block1.*} and "
        "caption_encoder.base.{h.*|encoder.layer.*} keys"
    )


def _dropped_reason(key: str) -> str | None:
    for pattern, reason in DROPPED:
        if re.search(pattern, key):
            return reason
    return None


def msclap_state_to_mlx(
    state: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map a msclap state dict (numpy) to MLX names and layouts; returns (weights, {dropped key: reason})."""
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, str] = {}
    for key, value in state.items():
        reason = _dropped_reason(key)
        if reason is not None:
            dropped[key] = reason
            continue
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise WeightsError(f"tensor {key} has dtype {arr.dtype}; only float weights are expected")
        arr = arr.astype(np.float32)
        new = key
        if key.endswith("logmel_extractor.melW"):
            new = MEL_KEY
        elif key.startswith(HTSAT_PREFIX):
            rest = key[len(HTSAT_PREFIX) :]
            for old, repl in LAION_TO_HF_RENAMES:
                rest = rest.replace(old, repl)
            new = HTSAT_PREFIX + rest
            if ".qkv." in new:
                for part, piece in zip(("query", "key", "value"), np.split(arr, 3, axis=0), strict=True):
                    out[new.replace(".qkv.", f".{part}.")] = np.ascontiguousarray(piece)
                continue
        if GPT2_CONV1D.match(key):
            arr = arr.T  # Conv1D stores (in, out)
        elif arr.ndim == 4:
            arr = arr.transpose(0, 2, 3, 1)  # OIHW -> OHWI
        out[new] = np.array(arr, dtype=np.float32, order="C")
    return out, dropped


def check_stft_kernels(state: dict[str, np.ndarray]) -> None:
    """The rfft frontend assumes torchlibrosa's periodic-Hann DFT kernels; refuse a checkpoint with others."""
    real = [v for k, v in state.items() if k.endswith("stft.conv_real.weight")]
    imag = [v for k, v in state.items() if k.endswith("stft.conv_imag.weight")]
    if not real or not imag:
        return
    n = np.arange(N_FFT)
    k = np.arange(N_FFT // 2 + 1)
    angle = 2 * np.pi * np.outer(k, n) / N_FFT
    win = periodic_hann(N_FFT).astype(np.float64)
    want_real = np.cos(angle) * win
    want_imag = -np.sin(angle) * win
    err = max(
        np.abs(np.asarray(real[0]).reshape(want_real.shape) - want_real).max(),
        np.abs(np.asarray(imag[0]).reshape(want_imag.shape) - want_imag).max(),
    )
    if err > 1e-5:
        raise WeightsError(
            f"the checkpoint's STFT kernels are not a periodic-Hann DFT (max deviation {err:.2e})"
        )


def expected_shapes(config: MsClapConfig) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    from mlx_clap.models.msclap.model import MsClapModel

    return {k: tuple(v.shape) for k, v in tree_flatten(MsClapModel(config).parameters())}


def reconcile(
    weights: dict[str, np.ndarray], config: MsClapConfig, allow_unexpected: bool = False
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Check names and shapes against the model; returns (weights, notes, unexpected keys).

    A missing filterbank is rebuilt as the original code builds it (and noted); any other missing tensor,
    a shape mismatch, or (unless allowed) an unexpected tensor is a WeightsError naming the keys.
    """
    expected = expected_shapes(config)
    notes: list[str] = []
    if MEL_KEY not in weights:
        weights[MEL_KEY] = slaney_mel_filterbank(
            config.mel_sampling_rate, config.window_size, config.mel_bins, config.fmin, config.fmax
        )
        notes.append(
            f"melW not in the checkpoint: rebuilt (Slaney, {config.mel_sampling_rate} Hz design rate, "
            f"{config.fmin}-{config.fmax} Hz)"
        )
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing tensors: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    if unexpected and not allow_unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensors: {', '.join(unexpected[:10])}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    for key in sorted(set(expected) & set(weights)):
        if tuple(weights[key].shape) != expected[key]:
            problems.append(
                f"{key}: shape {tuple(weights[key].shape)} in the checkpoint, model wants {expected[key]}"
            )
    if problems:
        raise WeightsError("; ".join(problems[:12]))
    for key in unexpected:
        weights.pop(key)
    return weights, notes, unexpected


def config_from_state(version: str, weights: dict[str, np.ndarray], source: str) -> MsClapConfig:
    """The released config of `version`, with vocabulary/position sizes read from the tensors."""
    config = MsClapConfig.for_version(version)
    config.source = source
    if version == "2023":
        wte = weights.get("caption_encoder.base.wte.weight")
        wpe = weights.get("caption_encoder.base.wpe.weight")
        if wte is not None:
            config.gpt2.vocab_size = int(wte.shape[0])
        if wpe is not None:
            config.gpt2.n_positions = int(wpe.shape[0])
    else:
        emb = weights.get("caption_encoder.base.embeddings.word_embeddings.weight")
        if emb is not None:
            config.bert.vocab_size = int(emb.shape[0])
    config.validate()  # the sizes read off the tensors must be sane before a model is built from them
    return config


# ------------------------------------------------------------------------------------------ tokenizer


def resolve_tokenizer_dir(
    text_model: str, tokenizer: str | Path | None, cache_dir: str | Path | None = None
) -> Path:
    """A folder with the text model's tokenizer files: the given one, or the hub cache (never downloads
    when HF_HUB_OFFLINE is set)."""
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        if not folder.is_dir() or not any((folder / n).is_file() for n in TOKENIZER_SOURCES):
            raise WeightsError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_SOURCES)})")
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(text_model, allow_patterns=list(TOKENIZER_SOURCES), cache_dir=cache_dir)
        )
    except Exception as exc:  # offline, not cached, or no network: say what to do instead
        raise WeightsError(
            f"cannot get the {text_model!r} tokenizer ({type(exc).__name__}: {exc}); pass --tokenizer DIR "
            f"with its tokenizer.json (or vocab files), or --no-tokenizer to convert the weights alone"
        ) from exc


def load_hf_tokenizer(src: Path, text_model: str):
    """The transformers fast tokenizer of `text_model` from a folder (tokenizer.json or vocab files)."""
    import transformers

    src = Path(src)
    gpt = "gpt" in text_model
    cls = transformers.GPT2TokenizerFast if gpt else transformers.BertTokenizerFast
    if (src / "tokenizer.json").is_file():
        tok = cls.from_pretrained(str(src)) if gpt else cls.from_pretrained(str(src), do_lower_case=True)
    elif gpt and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        # transformers 5's from_pretrained reads a bare vocab.json/merges.txt folder as an empty vocabulary.
        tok = cls(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"))
    elif not gpt and (src / "vocab.txt").is_file():
        tok = cls(vocab=str(src / "vocab.txt"), do_lower_case=True)
    else:
        want = "tokenizer.json or vocab.json + merges.txt" if gpt else "tokenizer.json or vocab.txt"
        raise WeightsError(f"{src}: no {text_model} tokenizer files ({want})")
    if len(tok) < 2:
        raise WeightsError(f"{src}: the {text_model} tokenizer loaded with an empty vocabulary")
    return tok


def write_tokenizer_json(src: Path, text_model: str, dest: Path, vocab_size: int | None = None) -> None:
    """Save the HF fast tokenizer msclap would use (with GPT-2's `!` pad token added) as tokenizer.json."""
    tok = load_hf_tokenizer(src, text_model)
    if "gpt" in text_model:
        tok.add_special_tokens({"pad_token": GPT2_PAD})
        if tok.convert_tokens_to_ids(GPT2_PAD) != 0:
            raise WeightsError(f"{src}: '!' is not token 0; msclap's GPT-2 pooling assumes it is")
    if vocab_size is not None and len(tok) > vocab_size:
        raise WeightsError(f"{src}: the tokenizer has {len(tok)} tokens, the checkpoint embeds {vocab_size}")
    backend = tok.backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dest))


# ------------------------------------------------------------------------------------------- convert


def read_msclap_state(path: Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """torch.load (weights-only unless `trust_pickle`) the `{'model': ...}` checkpoint as numpy arrays."""
    ckpt = torch_state_dict(path, "msclap .pth", trust_pickle=trust_pickle)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(
            f"{path}: expected a {{'model': state_dict}} checkpoint, got {type(ckpt).__name__}"
        )
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    return to_numpy(state)


def convert_msclap(
    src: str | Path,
    dest: str | Path,
    *,
    tokenizer: str | Path | None | bool = None,
    allow_unexpected: bool = False,
    source_name: str | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert `src` (.pth) into the folder `dest` (replaced if it exists); returns `dest`.

    `trust_pickle=True` allows a checkpoint that pickles more than tensors (full unpickling can run code
    from the file: trusted files only).

    `tokenizer`: a folder with the text model's tokenizer files, None to look in the hub cache, or False
    to write no tokenizer (text embedding then raises a clear error).
    """
    src = Path(src)
    dest = Path(dest)
    if not src.is_file():
        raise WeightsError(f"{src}: no such checkpoint file")
    state = read_msclap_state(src, trust_pickle=trust_pickle)
    try:
        version = detect_version(state)
        check_stft_kernels(state)
        weights, dropped = msclap_state_to_mlx(state)
        config = config_from_state(version, weights, source_name or src.name)
        weights, notes, unexpected = reconcile(weights, config, allow_unexpected)
    except (WeightsError, ValueError) as exc:
        raise WeightsError(f"{src}: {exc}") from exc
    tok_dir = None if tokenizer is False else resolve_tokenizer_dir(config.text_model, tokenizer or None)
    check_replaceable(dest)  # only our own earlier output (or nothing) is ever replaced

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        from safetensors.numpy import save

        (tmp / WEIGHTS_NAME).write_bytes(save(dict(sorted(weights.items())), metadata={"format": "mlx"}))
        atomic_write_json(tmp / CONFIG_NAME, config.to_dict())
        if tok_dir is not None:
            vocab = config.gpt2.vocab_size if config.is_gpt2 else config.bert.vocab_size
            write_tokenizer_json(tok_dir, config.text_model, tmp / TOKENIZER_NAME, vocab)
        else:
            notes.append("no tokenizer written: embed_text needs tokenizer.json (convert with --tokenizer)")
        manifest = provenance_manifest(
            CONVERTER,
            CONVERTER_VERSION,
            source_name or str(src),
            "msclap-pth",
            [src],
            version=version,
            dropped={k: dropped[k] for k in sorted(dropped)},
            unexpected_ignored=unexpected,
            notes=notes,
            format_version=config.format_version,
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        )
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        log.warning("%s: %s", src.name, note)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert CLAP_weights_{2022,2023}.pth to an mlx-clap folder")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None, help="folder with the text model's tokenizer")
    parser.add_argument("--no-tokenizer", action="store_true", help="convert the weights only")
    parser.add_argument("--allow-unexpected", action="store_true", help="ignore (and list) unknown tensors")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow full unpickling (can run code): trusted files only"
    )
    args = parser.parse_args(argv)
    tok: Path | None | bool = False if args.no_tokenizer else args.tokenizer
    try:
        out = convert_msclap(
            args.checkpoint,
            args.dest,
            tokenizer=tok,
            allow_unexpected=args.allow_unexpected,
            trust_pickle=args.trust_pickle,
        )
    except WeightsError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(out)


if __name__ == "__main__":
    main()
