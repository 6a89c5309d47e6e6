"""Build PyTorch reference models offline, with every parameter and buffer randomized.

Shared by the parity tests and the benchmarks. Nothing here is imported by the runtime package.

- `random_hf_clap(...)`: a transformers `ClapModel` of a real (or small) architecture.
- `randomize_(module, seed)`: realistic random values for every float parameter and buffer, so a wrong
  weight mapping cannot hide behind a default (ones, zeros, 2.659 logit scales, unit BN stats).
- `import_laion_clap()`: makes `laion_clap` 1.1.7 importable offline (stand-in torchvision, random-init
  RobertaModel instead of a hub download).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

# Architectures as in the hub configs (docs/numerics.md §1.1-1.2).
HTSAT_TINY = dict(patch_embeds_hidden_size=96, depths=[2, 2, 6, 2], hidden_size=768)
HTSAT_BASE = dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)


def randomize_(module, seed: int = 0) -> None:
    """Fill every float parameter and buffer of a torch module with realistic random values in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        named = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in named:
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif "logit_scale" in name:
                t.copy_(torch.tensor(2.0 + 2.0 * torch.rand((), generator=gen).item()))
            elif "LayerNorm" in name or "norm" in leaf.lower() or "layernorm" in name or ".norm" in name:
                if leaf == "weight":
                    t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif leaf == "bias":
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
            elif "melW" in name or "conv_real" in name or "conv_imag" in name:
                continue  # frontend constants: keep the real filterbank and DFT kernels
            elif leaf == "attn_mask":
                continue  # derived Swin shift masks (0 / -100), not learned: keep them as built
            elif t.dim() >= 2:
                fan_in = int(np.prod(t.shape[1:]))
                t.copy_(torch.randn(t.shape, generator=gen) / np.sqrt(max(fan_in, 1)))
            else:
                # 1-D non-bias parameters (BN weight, relative position tables handled as 2-D above)
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
        # BatchNorm weights named "...{1,4}.weight" inside fusion Sequentials are 1-D: covered above.


def hf_clap_config(audio: dict | None = None, text: dict | None = None, fusion: bool = False):
    """A transformers ClapConfig with hub-like settings (layer_norm_eps as in the hub configs)."""
    from transformers import ClapConfig

    audio_cfg = dict(HTSAT_TINY)
    audio_cfg.update(audio or {})
    audio_cfg["enable_fusion"] = fusion
    text_cfg = dict(text or {})
    return ClapConfig(audio_config=audio_cfg, text_config=text_cfg, projection_dim=512)


def random_hf_clap(audio: dict | None = None, text: dict | None = None, fusion: bool = False, seed: int = 0):
    """A random-init transformers ClapModel in eval mode with every parameter and buffer randomized."""
    import torch
    from transformers import ClapModel

    torch.manual_seed(seed)
    model = ClapModel(hf_clap_config(audio, text, fusion)).eval()
    randomize_(model, seed)
    return model


def save_hub_folder(model, folder: Path, safetensors: bool = True) -> Path:
    """Lay out a model folder as a hub repo would hold it: config.json + model.safetensors (or .bin)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


# ---------------------------------------------------------------------------------------------- LAION


def _stub_torchvision() -> None:
    """laion_clap imports torchvision at module level; the CUDA-linked wheel cannot load beside CPU torch."""
    if "torchvision" in sys.modules:
        return
    import torch

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    for name in ["Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop"]:
        setattr(transforms, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")

    class FrozenBatchNorm2d(torch.nn.Module):  # only referenced by an unused helper
        pass

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    datasets = types.ModuleType("torchvision.datasets")
    tv.transforms, tv.ops, tv.datasets = transforms, ops, datasets
    ops.misc = misc
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.ops": ops,
            "torchvision.ops.misc": misc,
            "torchvision.datasets": datasets,
        }
    )


def import_laion_clap():
    """Import `laion_clap.clap_module` offline and return it.

    `CLAP.__init__` calls `RobertaModel.from_pretrained('roberta-base')`; offline that fails, so it is
    replaced by a random-init roberta-base-shaped model (the test randomizes it anyway).
    """
    _stub_torchvision()
    # Put laion_clap's folder on sys.path (as its __init__ does) without running that __init__,
    # which imports the training data pipeline (pandas, webdataset, hub tokenizer downloads).
    import importlib.util

    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        # ModuleNotFoundError naming the package: conftest.py then skips the test where it is not installed.
        raise ModuleNotFoundError("laion_clap is not installed: pip install -e '.[test]'", name="laion_clap")
    folder = list(spec.submodule_search_locations)[0]
    if folder not in sys.path:
        sys.path.append(folder)
    import clap_module
    import clap_module.model as laion_model
    from transformers import RobertaConfig, RobertaModel

    class _RandomRoberta:
        @staticmethod
        def from_pretrained(*_args, **_kwargs):
            cfg = RobertaConfig(
                vocab_size=50265,
                max_position_embeddings=514,
                type_vocab_size=1,
                layer_norm_eps=1e-5,
                pad_token_id=1,
            )
            return RobertaModel(cfg)

    laion_model.RobertaModel = _RandomRoberta
    return clap_module


def random_laion_clap(amodel: str = "HTSAT-tiny", fusion: bool = False, seed: int = 0):
    """A random-init LAION `CLAP` (clap_module.model.CLAP) in eval mode, every weight randomized."""
    import torch

    clap_module = import_laion_clap()
    torch.manual_seed(seed)
    kwargs = dict(precision="fp32", device="cpu", enable_fusion=fusion)
    if fusion:
        kwargs["fusion_type"] = "aff_2d"
    model, cfg = clap_module.create_model(amodel, "roberta", **kwargs)
    model = model.eval()
    randomize_(model, seed)
    return model, cfg
