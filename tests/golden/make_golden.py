"""Regenerate tests/golden/tiny-unfused: a small converted model, input mels and HF reference outputs.

The golden lets the audio parity test run where torch/transformers are not installed. It is built from a
random-init transformers `ClapModel` (every parameter and buffer randomized), converted with our own HF
converter; the reference outputs come from transformers on CPU in float32.

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

# Narrow but complete: shifted and unshifted blocks in every stage that has windows, merging, 4 stages.
GOLDEN_AUDIO = dict(
    patch_embeds_hidden_size=8, depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 4, 8], hidden_size=64
)
GOLDEN_TEXT = dict(
    vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
)
N_CLIPS = 2
GOLDEN_DIM = 32
SEED = 7


def golden_features(n_clips: int = N_CLIPS, seed: int = SEED) -> np.ndarray:
    """Log-mel-like inputs (n, 1, 1001, 64), rounded to float16 so they can be stored at half the size."""
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((n_clips, 1, 1001, 64)) * 20.0 - 40.0
    return mel.astype(np.float16).astype(np.float32)


def main(out: Path = HERE / "tiny-unfused") -> None:
    import torch
    from reference_models import randomize_, save_hub_folder
    from transformers import ClapConfig, ClapModel

    from mlx_clap.convert.hf import convert_hf_folder

    torch.set_num_threads(1)
    # A narrow joint space too: the 512-d projections would dominate the file size.
    torch.manual_seed(SEED)
    config = ClapConfig(
        audio_config=dict(GOLDEN_AUDIO, projection_dim=GOLDEN_DIM),
        text_config=dict(GOLDEN_TEXT, projection_dim=GOLDEN_DIM),
        projection_dim=GOLDEN_DIM,
    )
    ref = ClapModel(config).eval()
    randomize_(ref, SEED)
    feats = golden_features()
    with torch.no_grad():
        x = torch.from_numpy(feats)
        audio = ref.audio_model(x)
        embeds = torch.nn.functional.normalize(ref.get_audio_features(x).pooler_output, dim=-1)
    with tempfile.TemporaryDirectory() as tmp:
        hub = save_hub_folder(ref, Path(tmp) / "hub")
        if out.exists():
            shutil.rmtree(out)
        convert_hf_folder(
            hub, out, source_name="random-init transformers ClapModel (tests/golden/make_golden.py)"
        )
    np.savez_compressed(
        out / "reference.npz",
        input_features=feats.astype(np.float16),
        pooler_output=audio.pooler_output.numpy(),
        audio_embeds=embeds.numpy(),
    )
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
