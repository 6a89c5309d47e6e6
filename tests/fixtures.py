"""Small shared test fixtures: tiny model configs and a converted tiny model folder.

The tiny configs keep the real frontend (1001 x 64 mels, spec_size 256, window 8) so every code path
runs, with narrow layers so a forward pass takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

TINY_AUDIO = dict(
    patch_embeds_hidden_size=16,
    depths=[1, 1, 1, 1],
    num_attention_heads=[1, 2, 4, 8],
    hidden_size=128,
)
TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)
