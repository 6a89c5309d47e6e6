"""`load(source)`: any supported model source to a ready `Embedder`.

- a converted mlx-clap folder (LAION/HF, msclap or PE-Audio family): loaded directly;
- a Hugging Face PE-Audio folder (`pe_audio`: PeAudioModel / PeAudioFrameLevelModel, safetensors): loaded
  in place; the audio-video and video kinds are refused with what is supported;
- a Hugging Face CLAP folder with safetensors weights: loaded directly through `ClapModel.sanitize`, its
  tokenizer files read in place (no second copy of the weights anywhere);
- a Hugging Face folder with only `pytorch_model.bin`, or a LAION `.pt` checkpoint: converted once into
  the cache (`$MLX_CLAP_CACHE`, default ~/.cache/mlx-clap) with torch (the `convert` extra), then loaded;
- a hub id `org/name`: downloaded with huggingface_hub (its own cache), then as a Hugging Face folder.

On a Linux CPU loading also applies the process-wide CPU choices (`ops.setup.prepare_cpu`: BLAS
rebinding, malloc tuning), each with its opt-out; importing the package never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_clap import settings as _settings
from mlx_clap.io import folder as fmt
from mlx_clap.io.hub import HUB_ID, cache_dir_for, download_hub, fingerprint
from mlx_clap.models.clap import ClapModel
from mlx_clap.models.msclap.model import MsClapModel, is_msclap_folder
from mlx_clap.models.pe_audio.model import PeAudioModel, is_pe_folder
from mlx_clap.ops.setup import prepare_cpu
from mlx_clap.pipeline import Embedder, embedder_for

PT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load(
    source: str | Path | None = None,
    dtype: Any = None,
    revision: str | None = None,
    trust_pickle: bool = False,
) -> Embedder:
    """Load a model from a converted folder, a Hugging Face folder, a LAION `.pt` or a hub id.

    `source` defaults to `$MLX_CLAP_MODEL` (else laion/clap-htsat-unfused). `dtype` is an MLX dtype or one
    of "float32", "float16", "bfloat16". Errors are `mlx_clap.io.folder.WeightsError` naming the file.
    Pickled checkpoints are read with torch's weights-only unpickler; `trust_pickle=True` allows one that
    pickles more (released LAION `.pt` files do), which can run code from the file: trusted files only.
    """
    s = _settings.current()
    prepare_cpu(s)
    text = str(source if source is not None else s.model)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _load_folder(path, dtype, label=None, revision=revision, trust_pickle=trust_pickle)
        if path.suffix in PT_SUFFIXES:
            return _load_converted(convert_to_cache(path, trust_pickle=trust_pickle), dtype)
        raise fmt.WeightsError(f"{path}: not a model folder or a LAION checkpoint (.pt); cannot load it")
    if HUB_ID.match(text) and not looks_local(text):
        snapshot = download_hub(text, revision=revision)
        # The snapshot folder is named by its commit: that is the recorded revision.
        return _load_folder(snapshot, dtype, label=text, revision=snapshot.name, trust_pickle=trust_pickle)
    # A local path: no hub hint, which would only mislead (the user meant a file here).
    raise fmt.WeightsError(f"{path.absolute()}: no such file or folder")


def looks_local(text: str) -> bool:
    """Whether an `org/name`-shaped string that does not exist is still meant as a local path: its first
    component is an existing folder here (`models/clap`), or it names a checkpoint file (`x/y.pt`)."""
    first = Path(text).expanduser().parts[0]
    return Path(first).is_dir() or Path(text).suffix in PT_SUFFIXES or text.endswith(("/", ".safetensors"))


def _load_converted(folder: Path, dtype: Any) -> Embedder:
    if is_pe_folder(folder):
        return embedder_for(PeAudioModel.from_pretrained(folder, dtype=dtype), folder)
    if is_msclap_folder(folder):
        return embedder_for(MsClapModel.from_pretrained(folder, dtype=dtype), folder)
    return embedder_for(ClapModel.from_pretrained(folder, dtype=dtype), folder)


def _load_folder(
    folder: Path, dtype: Any, label: str | None, revision: str | None, trust_pickle: bool = False
) -> Embedder:
    if is_pe_folder(folder):  # converted or Hugging Face: both load in place (other PE kinds: refused)
        model = PeAudioModel.from_pretrained(folder, dtype=dtype)
        if label:
            model.config.source = label
        return embedder_for(model, folder)
    if is_msclap_folder(folder) or fmt.is_converted_folder(folder):
        return _load_converted(folder, dtype)
    if not (folder / fmt.CONFIG_NAME).is_file():
        raise fmt.WeightsError(
            f"{folder}: neither a converted mlx-clap folder nor a Hugging Face model folder (no config.json)"
        )
    has_safetensors = (folder / fmt.WEIGHTS_NAME).is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()
    if not has_safetensors:  # pytorch_model.bin only: a torch conversion, once, into the cache
        dest = convert_to_cache(
            folder,
            revision=revision,
            name=(label or folder.name).replace("/", "--"),
            label=label,
            trust_pickle=trust_pickle,
        )
        return _load_converted(dest, dtype)
    try:
        model = ClapModel.from_pretrained(folder, dtype=dtype)
    except fmt.WeightsError as exc:
        # Our own output with a broken config.json reads as a Hugging Face folder and fails on shapes;
        # say what it really is.
        damaged = fmt.already_converted_problem(folder)
        if damaged is None:
            raise
        raise fmt.WeightsError(f"{exc}. This is no Hugging Face folder: {damaged}") from exc
    if label:
        model.config.source = label
    return embedder_for(model, folder)


def convert_to_cache(
    source: str | Path,
    revision: str | None = None,
    name: str | None = None,
    label: str | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a Hugging Face `.bin` folder or a LAION `.pt` into the cache once; return the converted folder.

    `name` names the cache entry (default: the folder or file name); `label` is the source recorded in
    the manifest (default: the path), e.g. the hub id for a downloaded snapshot. `trust_pickle` as in
    `load` (a file already converted into the cache is not read again).
    """
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        key = f"hf:{path}:{revision or fingerprint(files)}"
    else:
        key = f"pt:{path}:{fingerprint([path])}"
    dest = cache_dir_for(name or (path.name if path.is_dir() else path.stem), key)
    if fmt.is_converted_folder(dest):
        return dest
    if path.is_dir():
        from mlx_clap.convert.hf import convert_hf_folder

        convert_hf_folder(
            path, dest, source_name=label or str(path), revision=revision, trust_pickle=trust_pickle
        )
    else:
        from mlx_clap.convert.laion_pt import convert_laion_pt

        convert_laion_pt(path, dest, source_name=label or str(path), trust_pickle=trust_pickle)
    return dest


__all__ = ["PT_SUFFIXES", "convert_to_cache", "load", "looks_local"]
