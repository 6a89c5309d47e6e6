"""Build msclap 1.3.4's own reference models offline, with every parameter and buffer randomized.

msclap downloads at construction: `models.clap.TextEncoder` calls `AutoModel.from_pretrained(text_model)`
and `CLAPWrapper.load_clap` calls `AutoTokenizer.from_pretrained(text_model)` (plus the weights from the
hub). Offline, these are replaced by:
- a random-init `GPT2Model(GPT2Config())` / `BertModel(BertConfig())` (the default configs are gpt2-small
  and bert-base-uncased), randomized by `reference_models.randomize_`;
- tokenizers built by transformers from small vocabularies trained here (GPT-2-style byte-level BPE with
  `!` at id 0 and `<|endoftext|>` last; BERT-style uncased WordPiece with `[PAD]` at id 0).

`CLAPWrapper` itself imports torchaudio (its file loader), which is not installed; a stand-in module lets
the class import, and its text preprocessing, similarity and embedding helpers run unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from fixtures import TOKENIZER_TEXTS, _bpe_corpus  # noqa: E402
from reference_models import randomize_  # noqa: E402

# Texts for msclap tokenization: the shared fixtures plus `!` cases (the pad-token quirk).
MSCLAP_TEXTS = [
    *TOKENIZER_TEXTS,
    "a dog barks!",
    "wow! a loud bang!! then silence",
    "!",
    "! leading",
    "this is the sound of rain",
]


def _import_clap_wrapper_module():
    """Import msclap.CLAPWrapper, which imports torchaudio (+ .transforms) at module level.

    Only its file loader uses torchaudio, which is not installable beside torch 2.13 here. A stand-in is
    put in sys.modules just for the import and removed afterwards, so nothing else in the test session
    sees a fake torchaudio; the wrapper module keeps its own reference (see `clip_loader`).
    """
    if "msclap.CLAPWrapper" in sys.modules:
        return sys.modules["msclap.CLAPWrapper"]
    import importlib
    import importlib.machinery
    import importlib.util

    if importlib.util.find_spec("torchaudio") is not None:
        return importlib.import_module("msclap.CLAPWrapper")
    import transformers  # noqa: F401  (its optional-package probes must not see the stand-in)

    ta = types.ModuleType("torchaudio")
    transforms = types.ModuleType("torchaudio.transforms")
    ta.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchaudio.transforms", None)

    def _no_load(*_a, **_k):
        raise RuntimeError("torchaudio stand-in: the msclap reference never loads files")

    ta.load = _no_load
    transforms.Resample = _no_load
    ta.transforms = transforms
    stubs = {"torchaudio": ta, "torchaudio.transforms": transforms}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("msclap.CLAPWrapper")
    finally:
        for name, mod in stubs.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


@contextlib.contextmanager
def clip_loader(wave: np.ndarray, sr: int):
    """Make msclap's `torchaudio.load(path)` return `(wave as (channels, N) tensor, sr)`, as a file would."""
    import torch

    ta = _import_clap_wrapper_module().torchaudio
    saved = ta.load
    ta.load = lambda *_a, **_k: (torch.from_numpy(np.atleast_2d(wave)), sr)
    try:
        yield
    finally:
        ta.load = saved


def train_gpt2_files(folder: Path, vocab_size: int = 1200) -> Path:
    """A GPT-2-style byte-level BPE (vocab.json + merges.txt): `!` is id 0, `<|endoftext|>` last."""
    import json

    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    corpus = _bpe_corpus() + [t for t in MSCLAP_TEXTS if t] * 3
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    if vocab.get("!") != 0:
        raise RuntimeError(f"trained BPE puts '!' at {vocab.get('!')}, the GPT-2 layout needs 0")
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return folder


def train_bert_files(folder: Path, vocab_size: int = 1200) -> Path:
    """A bert-base-uncased-style WordPiece vocab.txt with `[PAD]`=0, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`."""
    from tokenizers import BertWordPieceTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    corpus = _bpe_corpus() + [t for t in MSCLAP_TEXTS if t] * 3
    wp.train_from_iterator(
        corpus,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    wp.save_model(str(folder))
    return folder


def hf_tokenizer(folder: Path, text_model: str):
    """The transformers tokenizer msclap would get from `AutoTokenizer.from_pretrained(text_model)`."""
    from transformers import BertTokenizerFast, GPT2TokenizerFast

    folder = Path(folder)
    if "gpt" in text_model:
        # transformers 5's from_pretrained reads a bare vocab.json/merges.txt folder as an empty vocabulary.
        return GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)


def import_msclap(tokenizer_dirs: dict[str, Path] | None = None):
    """Import msclap offline and return (models.clap module, CLAPWrapper class).

    `tokenizer_dirs` maps a text model name to a folder made by `train_*_files`, for the wrapper's
    `AutoTokenizer.from_pretrained`.
    """
    wrapper_mod = _import_clap_wrapper_module()
    import msclap.models.clap as clap_mod
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    class _RandomAutoModel:
        @staticmethod
        def from_pretrained(name, *_a, **_k):
            if "gpt" in name:
                return GPT2Model(GPT2Config())
            if "bert" in name:
                return BertModel(BertConfig())
            raise ValueError(f"offline reference has no text model {name!r}")

    class _OfflineAutoTokenizer:
        @staticmethod
        def from_pretrained(name, *_a, **_k):
            if not tokenizer_dirs or name not in tokenizer_dirs:
                raise OSError(f"offline reference: no tokenizer files for {name!r}")
            return hf_tokenizer(tokenizer_dirs[name], name)

    clap_mod.AutoModel = _RandomAutoModel
    wrapper_mod.AutoTokenizer = _OfflineAutoTokenizer
    return clap_mod, wrapper_mod.CLAPWrapper


def random_msclap(
    version: str, tokenizer_dir: Path | None = None, seed: int = 0, checkpoint: Path | None = None
):
    """A `CLAPWrapper` around a random-init msclap `CLAP` of the released architecture, in eval mode.

    The wrapper is built as `CLAPWrapper.load_clap` builds it (same yml, same constructor, same tokenizer
    call); every parameter and buffer is randomized. If `checkpoint` is given, the weights are also saved
    there in the released file layout `{'model': state_dict}`.
    """
    import torch

    text_model = "gpt2" if version == "2023" else "bert-base-uncased"
    dirs = {text_model: tokenizer_dir} if tokenizer_dir is not None else None
    clap_mod, CLAPWrapper = import_msclap(dirs)
    wrapper = CLAPWrapper.__new__(CLAPWrapper)
    wrapper.config_as_str = (
        Path(sys.modules["msclap.CLAPWrapper"].__file__).parent / f"configs/config_{version}.yml"
    ).read_text()
    wrapper.use_cuda = False
    args = wrapper.read_config_as_args(wrapper.config_as_str, is_config_str=True)
    wrapper.token_keys = (
        ["input_ids", "attention_mask"]
        if "gpt" in args.text_model
        else ["input_ids", "token_type_ids", "attention_mask"]
    )
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    # Skip torch/transformers weight init (seconds per 100M parameters): randomize_ overwrites every
    # float parameter and buffer below, except the frontend constants and shift masks, which the
    # constructors compute directly rather than through init functions.
    htsat_mod = sys.modules["msclap.models.htsat"]
    trunc_normal = htsat_mod.trunc_normal_
    htsat_mod.trunc_normal_ = lambda tensor, *a, **k: tensor  # HTSAT's own init, also overwritten below
    try:
        with no_init_weights():
            clap = clap_mod.CLAP(
                audioenc_name=args.audioenc_name,
                sample_rate=args.sampling_rate,
                window_size=args.window_size,
                hop_size=args.hop_size,
                mel_bins=args.mel_bins,
                fmin=args.fmin,
                fmax=args.fmax,
                classes_num=args.num_classes,
                out_emb=args.out_emb,
                text_model=args.text_model,
                transformer_embed_dim=args.transformer_embed_dim,
                d_proj=args.d_proj,
            ).eval()
    finally:
        htsat_mod.trunc_normal_ = trunc_normal
    # The Swin shift masks are float buffers: keep them (randomize_ would fill them like weights).
    masks = {k: v.clone() for k, v in clap.named_buffers() if k.endswith("attn_mask")}
    randomize_(clap, seed)
    with torch.no_grad():
        for name, buf in clap.named_buffers():
            if name in masks:
                buf.copy_(masks[name])
        for name, t in list(clap.named_parameters()) + list(clap.named_buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RuntimeError(f"reference tensor {name} is not finite after randomization")
    if checkpoint is not None:
        torch.save({"model": clap.state_dict()}, checkpoint)
    wrapper.clap = clap
    wrapper.args = args
    if tokenizer_dir is not None:
        tok = sys.modules["msclap.CLAPWrapper"].AutoTokenizer.from_pretrained(args.text_model)
        if "gpt" in args.text_model:
            tok.add_special_tokens({"pad_token": "!"})
        if not hasattr(tok, "encode_plus"):
            # transformers 5 dropped encode_plus (msclap pins <5); for one text it was __call__ itself.
            tok.encode_plus = tok.__call__
        wrapper.tokenizer = tok
    else:
        wrapper.tokenizer = None
    return wrapper


# ------------------------------------------------------------------------------------ parity helpers


def rel_err(ref, got) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def make_signal(n: int, sr: int = 44100, seed: int = 0) -> np.ndarray:
    """Tones + noise, a -60 dBFS section and digital silence (docs/numerics.md §9 fixtures), float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150.5 * t)
    x += 0.05 * rng.standard_normal(n)
    q = n // 4
    x[q : 2 * q] *= 1e-3  # -60 dB
    x[2 * q : 2 * q + n // 8] = 0.0  # digital silence
    return x.astype(np.float32)


def torch_audio_stages(clap, waveforms: np.ndarray) -> dict[str, np.ndarray]:
    """Run msclap's audio encoder on (B, N) waveforms; named stages in the MLX layouts (channels last)."""
    import torch

    caps: dict[str, np.ndarray] = {}
    base = clap.audio_encoder.base
    hooks = []

    def keep(name, fn=lambda out: out):
        def hook(_mod, _inp, out):
            caps[name] = fn(out).detach().numpy().copy()

        return hook

    if hasattr(base, "htsat"):
        h = base.htsat
        hooks.append(h.logmel_extractor.register_forward_hook(keep("logmel", lambda o: o[:, 0])))
        hooks.append(h.patch_embed.register_forward_hook(keep("patch_embed")))  # (B, L, C)
        for i, layer in enumerate(h.layers):
            hooks.append(layer.register_forward_hook(keep(f"layers.{i}", lambda o: o[0])))
        hooks.append(h.norm.register_forward_hook(keep("norm")))
    else:
        hooks.append(base.logmel_extractor.register_forward_hook(keep("logmel", lambda o: o[:, 0])))
        # bn0 runs on (B, mel, T, 1); conv blocks output (B, C, T, F): both to channels last.
        hooks.append(base.bn0.register_forward_hook(keep("bn0", lambda o: o.permute(0, 2, 1, 3))))
        for i in range(1, 7):
            block = getattr(base, f"conv_block{i}")
            hooks.append(block.register_forward_hook(keep(f"conv_block{i}", lambda o: o.permute(0, 2, 3, 1))))

    def proj_hook(_mod, inp, out):
        caps["embedding"] = inp[0].detach().numpy().copy()
        caps["projected"] = out.detach().numpy().copy()

    hooks.append(clap.audio_encoder.projection.register_forward_hook(proj_hook))
    try:
        with torch.no_grad():
            clap.audio_encoder(torch.from_numpy(np.ascontiguousarray(waveforms)))
    finally:
        for hk in hooks:
            hk.remove()
    return caps


def torch_text_stages(wrapper, texts: list[str]) -> dict[str, object]:
    """msclap's own text path (`preprocess_text` + caption encoder) plus per-layer hidden states."""
    import torch

    tokens = wrapper.preprocess_text(texts)
    caps: dict[str, object] = {"tokens": {k: tokens[k].numpy() for k in wrapper.token_keys}}
    enc = wrapper.clap.caption_encoder

    def proj_hook(_mod, inp, out):
        caps["pooled"] = inp[0].detach().numpy().copy()
        caps["projected"] = out.detach().numpy().copy()

    def base_hook(_mod, _inp, out):
        caps["base_output"] = out

    hooks = [enc.projection.register_forward_hook(proj_hook), enc.base.register_forward_hook(base_hook)]
    # One run through msclap's own TextEncoder.forward, with the text model also returning its layers.
    enc.base.config.output_hidden_states = True
    try:
        with torch.no_grad():
            wrapper._get_text_embeddings(tokens)
    finally:
        enc.base.config.output_hidden_states = False
        for hk in hooks:
            hk.remove()
    out = caps.pop("base_output")
    caps["hidden_states"] = [h.numpy() for h in out.hidden_states]
    caps["last_hidden_state"] = out.last_hidden_state.numpy()
    if "gpt" in wrapper.args.text_model:
        caps["index"] = (torch.ne(tokens["input_ids"], 0).sum(-1) - 1).numpy()
    return caps
