"""Build transformers PE-Audio references offline, with every parameter randomized, and their tokenizer.

Shared by the PE-Audio tests. Nothing here is imported by the runtime package.

- `random_pe_audio(frame_level, config, seed)`: a `PeAudioModel` / `PeAudioFrameLevelModel` of the released
  architecture (transformers' `PeAudioConfig()` defaults: DAC ratios 2-8-10-12, 6 x 1792 audio transformer,
  ModernBERT-large text tower, 606 M parameters) or a small one, built without transformers' weight init
  (we overwrite every parameter) and randomized by `randomize_pe_`.
- `modernbert_tokenizer(vocab_size, ...)`: a `tokenizers` byte-level BPE laid out as ModernBERT's
  (`[CLS] ... [SEP]` template, [UNK]/[CLS]/[SEP]/[PAD]/[MASK] at 50280-50284 of a 50368 table), trained
  on a small corpus and filled with unused entries to the model's vocabulary size.
- `save_pe_folder(model, tokenizer, folder)`: the hub layout (config.json + model.safetensors +
  tokenizer.json + preprocessor_config.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

# A small architecture for fast tests: every kind of layer the released one has (GQA included), tiny, with
# the released hop (1920 samples: 25 frames a second).
TINY_AUDIO = dict(
    dac_config=dict(encoder_hidden_size=4, downsampling_ratios=[8, 8, 30], hidden_size=24, codebook_dim=8),
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
TINY_TEXT = dict(
    vocab_size=50368,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    local_attention=8,
)
CORPUS = [
    "a dog barks in the distance while rain falls on a tin roof",
    "glass breaking, then somebody speaking quietly",
    "an orchestra tunes up before the concert begins",
    "birds singing at dawn near a small river",
    "a car engine starts and drives away on gravel",
    "footsteps on a wooden floor, a door creaks open",
    "thunder rolls over the hills during a summer storm",
    "a baby laughs and claps her hands",
]
SPECIALS = {"[UNK]": 50280, "[CLS]": 50281, "[SEP]": 50282, "[PAD]": 50283, "[MASK]": 50284}


def randomize_pe_(model, seed: int = 0) -> None:
    """Realistic random values for every parameter of a PE-Audio model, in place.

    The shared CLAP rules (tests/reference_models.py: weights N(0, 1/fan_in), biases N(0, 0.05), norm
    scales 1 + N(0, 0.2)), then PE-specific ones: Snake alphas in [0.5, 2] (a value near 0 would make
    1/alpha explode), the residual branches of the codec damped by 0.3 so twelve of them keep activations
    of a few units, a class token of the tokens' magnitude, a sigmoid scale in [5, 15] and bias in
    [-12, -3] (as SigLIP-style training leaves them). Buffers that are not saved with the model (the rotary
    inverse frequencies) are derived from the config: they keep their values.
    """
    import torch
    from reference_models import randomize_

    saved = set(model.state_dict())
    derived = {n: b.clone() for n, b in model.named_buffers() if n not in saved}
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(".alpha"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=gen))
            elif ".res_unit" in name and name.endswith(".conv2.weight"):
                t.mul_(0.3)
            elif name.endswith("class_embedding"):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif name.endswith("logit_scale"):
                t.copy_(5.0 + 10.0 * torch.rand(t.shape, generator=gen))
            elif name.endswith("logit_bias"):
                t.copy_(-3.0 - 9.0 * torch.rand(t.shape, generator=gen))
        for name, b in model.named_buffers():
            if name in derived:
                b.copy_(derived[name])


def pe_config(audio: dict | None = None, text: dict | None = None):
    """A transformers PeAudioConfig: the released architecture by default (`PeAudioConfig()`)."""
    from transformers import PeAudioConfig

    kwargs = {}
    if audio is not None:
        kwargs["audio_config"] = audio
    if text is not None:
        kwargs["text_config"] = text
    return PeAudioConfig(**kwargs)


def random_pe_audio(
    frame_level: bool = False, audio: dict | None = None, text: dict | None = None, seed: int = 0
):
    """A randomized transformers PeAudioModel (or PeAudioFrameLevelModel) in eval mode, float32."""
    import torch
    from transformers import PeAudioFrameLevelModel, PeAudioModel
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    cls = PeAudioFrameLevelModel if frame_level else PeAudioModel
    # transformers' own init of 606 M parameters takes ~100 s on 2 cores; every value is overwritten below.
    with no_init_weights():
        model = cls(pe_config(audio, text))
    model = model.float().eval()
    randomize_pe_(model, seed)
    return model


def _trained_bpe() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of a small byte-level BPE trained on CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def modernbert_tokenizer(vocab_size: int = 50368, specials: dict[str, int] | None = None):
    """A `tokenizers.Tokenizer` laid out as ModernBERT's, with exactly `vocab_size` entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = dict(SPECIALS if specials is None else specials)
    vocab, merges = _trained_bpe()
    taken = set(specials.values())
    ids = (i for i in range(vocab_size) if i not in taken)
    full = {token: next(ids) for token in sorted(vocab, key=vocab.get)}
    full.update(specials)
    for i in ids:
        full[f"[unused{i}]"] = i
    tok = Tokenizer(models.BPE(vocab=full, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    cls, sep = specials["[CLS]"], specials["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def save_pe_folder(model, folder: Path, tokenizer=None) -> Path:
    """Lay out a model folder as a hub repo holds it (safetensors, config, preprocessor, tokenizer)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    pre = {"feature_extractor_type": "PeAudioFeatureExtractor", "sampling_rate": 48000, "hop_length": 1920}
    pre["hop_length"] = model.config.audio_config.dac_config.hop_length
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def hf_tokens(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """transformers' tokenization of `texts` with the folder's tokenizer.json (padded to the longest)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), pad_token="[PAD]")
    enc = tok(texts, padding=True, return_tensors="np")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def feature_batch(waves: list[np.ndarray], hop: int = 1920) -> dict[str, np.ndarray]:
    """transformers' PeAudioFeatureExtractor on in-memory clips: input_values (B, 1, N) and padding_mask."""
    from transformers import PeAudioFeatureExtractor

    fx = PeAudioFeatureExtractor(hop_length=hop)
    out = fx(waves, sampling_rate=48000, return_tensors="np")
    return {"input_values": np.asarray(out["input_values"]), "padding_mask": np.asarray(out["padding_mask"])}


def make_signal(n: int, seed: int, sr: int = 48000) -> np.ndarray:
    """Tones, noise, a quiet part and digital silence, at most 0.5 full scale (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.1 * rng.standard_normal(n)
    x[n // 2 : n // 2 + n // 8] *= 1e-3
    x[-n // 10 :] = 0.0
    return x.astype(np.float32)


def torch_stages(
    model, input_values: np.ndarray, padding_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The reference audio tower's stages (forward hooks), named as `PeAudioEncoder`'s capture in MLX.

    Codec stages come back channels last, (B, T, C), as the MLX modules hold them.
    """
    import torch

    enc = model.audio_encoder
    dac = enc.embedder.dac_encoder
    out: dict[str, np.ndarray] = {}
    hooks = []

    def grab(name, channels_first=False, index=None):
        def hook(_module, _inputs, output):
            value = output[index] if index is not None else output
            value = value.detach()
            out[name] = (value.transpose(1, 2) if channels_first else value).numpy().copy()

        return hook

    hooks.append(dac.conv1.register_forward_hook(grab("dac.conv1", True)))
    for i, block in enumerate(dac.block):
        hooks.append(block.register_forward_hook(grab(f"dac.block.{i}", True)))
    hooks.append(dac.conv2.register_forward_hook(grab("dac.conv2", True)))
    hooks.append(enc.embedder.bottleneck.register_forward_hook(grab("codec_features", True)))
    hooks.append(enc.embedder.register_forward_hook(grab("embedder", index=0)))
    hooks.append(enc.patch_embedder.register_forward_hook(grab("patch_embedder", index=0)))
    for i, layer in enumerate(enc.layers):
        hooks.append(layer.register_forward_hook(grab(f"layers.{i}")))
    hooks.append(enc.output.register_forward_hook(grab("output")))
    try:
        with torch.no_grad():
            mask = None if padding_mask is None else torch.from_numpy(padding_mask)
            res = enc(input_values=torch.from_numpy(input_values), padding_mask=mask)
            out["pooled_embeds"] = model.audio_head(res.pooler_output).numpy()
            out["frame_embeds"] = model.audio_head(res.last_hidden_state).numpy()
    finally:
        for h in hooks:
            h.remove()
    return out


def torch_text(model, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference text tower through `forward` (its `get_text_audio_embeds` is broken in 5.25: it reads
    hidden_states without asking for them): per-layer states and the raw text embedding."""
    import torch

    ids = torch.from_numpy(tokens["input_ids"].astype(np.int64))
    mask = torch.from_numpy(tokens["attention_mask"].astype(np.int64))
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        embeds = model.text_audio_head(out.hidden_states[-1][:, 0])
    states = {f"layers.{i}": h.numpy() for i, h in enumerate(out.hidden_states[1:-1])}
    states["embeddings"] = out.hidden_states[0].numpy()
    states["final_norm"] = out.last_hidden_state.numpy()
    states["text_embeds"] = embeds.numpy()
    return states


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
