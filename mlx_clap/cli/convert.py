"""`mlx-clap convert`: turn a Hugging Face CLAP or PE-Audio folder, a hub id or a LAION `.pt` into a converted
folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_clap.io.folder import MANIFEST_NAME, WeightsError, check_replaceable
from mlx_clap.io.hub import HUB_ID, download_hub
from mlx_clap.loading import PT_SUFFIXES


@click.command("convert")
@click.argument("source")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--revision", default=None, help="Hub revision (branch, tag, commit) for a hub id.")
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder with tokenizer files to copy in (LAION .pt files have none: use roberta-base's).",
)
@click.option(
    "--family",
    type=click.Choice(["auto", "laion", "msclap"]),
    default="auto",
    show_default=True,
    help="Checkpoint family of a .pt/.pth file; auto takes msclap only for Microsoft's CLAP_weights_*.pth "
    "files, LAION otherwise.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace DEST if it is an earlier mlx-clap converted folder (other non-empty folders are refused).",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a .pt/.pth/pytorch_model.bin that pickles more than tensors (released LAION .pt files do) "
    "to be fully unpickled. Unpickling can run code from the file: only for files from a trusted source.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest of the converted folder as JSON.")
def convert(
    source: str,
    dest: Path,
    revision: str | None,
    tokenizer: Path | None,
    family: str,
    force: bool,
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Convert SOURCE into an mlx-clap folder DEST (config.json, model.safetensors, tokenizer, manifest).

    SOURCE is a Hugging Face CLAP or Perception Encoder Audio model folder (config.json +
    model.safetensors, or pytorch_model.bin with torch installed), a hub id such as
    laion/clap-htsat-unfused or facebook/pe-a-frame-base, or an original LAION checkpoint (.pt, needs
    torch). The safetensors path needs no torch. An already converted folder needs no conversion: pass
    it to --model as it is. A Hugging Face folder with safetensors also loads in place (--model FOLDER);
    converting writes the MLX layout once, with a manifest of the source's sha256 and revision.

    Pickled checkpoints are read with torch's weights-only unpickler, which cannot run code. Released
    LAION .pt files pickle numpy scalars and training arguments too, so they need --trust-pickle: give
    it only for a file from a source you trust. A --tokenizer must fit the model (its vocabulary size
    equal to the model's word-embedding rows). --force replaces DEST only when DEST is empty or an
    earlier mlx-clap converted folder; the new folder is swapped in whole.

    \b
    Examples:
      mlx-clap convert laion/clap-htsat-fused weights/clap-htsat-fused
      mlx-clap convert ~/models/clap-htsat-unfused weights/clap-htsat-unfused
      mlx-clap convert ~/models/pe-a-frame-base weights/pe-a-frame-base
      mlx-clap convert 630k-audioset-best.pt weights/630k --tokenizer ~/roberta-base --trust-pickle
      mlx-clap convert CLAP_weights_2023.pth weights/msclap-2023 --tokenizer ~/gpt2
    """
    check_dest(dest, force)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            out = _convert_folder(path, dest, str(path), revision, tokenizer, trust_pickle)
        elif path.is_file():
            if path.suffix not in PT_SUFFIXES:
                raise WeightsError(f"{path}: not a LAION checkpoint (.pt) or a model folder")
            if family == "auto":
                family = "msclap" if _looks_like_msclap(path) else "laion"
            if family == "msclap":
                from mlx_clap.convert.msclap import convert_msclap

                out = convert_msclap(
                    path, dest, tokenizer=tokenizer, source_name=str(path), trust_pickle=trust_pickle
                )
            else:
                from mlx_clap.convert.laion_pt import convert_laion_pt

                out = convert_laion_pt(
                    path, dest, source_name=str(path), tokenizer_dir=tokenizer, trust_pickle=trust_pickle
                )
        elif HUB_ID.match(source):
            snapshot = download_hub(source, revision=revision)
            out = _convert_folder(snapshot, dest, source, snapshot.name, tokenizer, trust_pickle)
        else:
            raise WeightsError(f"{source}: no such file or folder, and not a hub id of the form org/name")
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    tok = ", ".join(manifest.get("tokenizer_files", [])) or "none (text embedding needs tokenizer files)"
    click.echo(f"converted {source} -> {out}")
    click.echo(f"  tokenizer: {tok}")


def _convert_folder(
    folder: Path,
    dest: Path,
    source_name: str,
    revision: str | None,
    tokenizer: Path | None,
    trust_pickle: bool,
) -> Path:
    """A Hugging Face folder (or hub snapshot) of either family: CLAP, or Perception Encoder Audio."""
    from mlx_clap.models.pe_audio.model import is_pe_folder

    if is_pe_folder(folder):  # also the PE kinds we do not run, so the refusal says what they are
        from mlx_clap.convert.pe_audio import convert_pe_audio_folder

        return convert_pe_audio_folder(
            folder,
            dest,
            source_name=source_name,
            revision=revision,
            tokenizer_dir=tokenizer,
            trust_pickle=trust_pickle,
        )
    from mlx_clap.convert.hf import convert_hf_folder

    return convert_hf_folder(
        folder,
        dest,
        source_name=source_name,
        revision=revision,
        tokenizer_dir=tokenizer,
        trust_pickle=trust_pickle,
    )


def check_dest(dest: Path, force: bool) -> None:
    """DEST must be new or empty; with --force it may also be an earlier mlx-clap converted folder,
    never any other folder (a typo such as `--force ~` must not delete a home directory)."""
    if dest.exists() and not dest.is_dir():
        raise click.ClickException(f"{dest}: exists and is not a folder")
    if not dest.exists() or not any(dest.iterdir()):
        return
    if not force:
        raise click.ClickException(
            f"{dest}: folder exists and is not empty (use --force to replace an earlier converted folder)"
        )
    try:
        check_replaceable(dest)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from exc


def _looks_like_msclap(path: Path) -> bool:
    """Microsoft's released files are CLAP_weights_<year>.pth; any other name (LAION's *.pt, or a LAION
    checkpoint saved as .pth) is taken as LAION: --family msclap says otherwise."""
    return path.name.lower().startswith("clap_weights")
