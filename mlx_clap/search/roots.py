"""The library folders a store was embedded from, recorded in its manifest: what `serve` may read.

A store's rows name files by absolute path, and a store can be received from elsewhere: rows naming
`/etc/passwd` or `~/.ssh/id_rsa` are only lines of text. So `mlx-clap embed` records the folders it was
given (`library_roots` in the store's manifest: the resolved folder of each PATH argument, the file's folder
for a file argument, merged with the folders recorded before), and a row's file may be read (played,
drawn as a waveform) only when

- its path is absolute and ends in an audio suffix the decoder picks up in folders (`AUDIO_SUFFIXES`);
- its folder, every symbolic link resolved, lies inside one of the recorded folders (also resolved).

A store made before roots were recorded has none: `serve` then plays nothing from it and says how to
record them (`mlx-clap embed` over the library once more re-embeds nothing), and `mlx-clap check`
notes it. `check` lists the rows that fail the rules above (`check_rows`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from mlx_clap.preprocess.decode_ahead import AUDIO_SUFFIXES

ROOTS_KEY = "library_roots"


def input_roots(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The library folders of `embed` PATH arguments: each existing folder, or a file's folder, with
    every symbolic link resolved (arguments that do not exist add nothing)."""
    roots = []
    for raw in paths:
        p = os.path.abspath(os.path.expanduser(os.fspath(raw)))
        if os.path.isdir(p):
            roots.append(os.path.realpath(p))
        elif os.path.lexists(p):
            roots.append(os.path.realpath(os.path.dirname(p)))
    return roots


def inside(folder: str, root: str) -> bool:
    """Whether `folder` is `root` or lies under it (both absolute, normalized)."""
    return folder == root or folder.startswith(root.rstrip(os.sep) + os.sep)


def merge_roots(*groups: Iterable[str]) -> list[str]:
    """The union of folder lists, sorted, without folders that lie inside another one."""
    every = sorted({os.path.normpath(r) for g in groups for r in g})
    return [r for r in every if not any(o != r and inside(r, o) for o in every)]


def recorded_roots(manifest: Any) -> list[str] | None:
    """The library folders a manifest records; None when it records none (an older store) or the entry
    is not a list of absolute paths (then nothing is trusted)."""
    roots = manifest.get(ROOTS_KEY) if isinstance(manifest, dict) else None
    if not isinstance(roots, list) or not roots:
        return None
    if not all(isinstance(r, str) and os.path.isabs(r) and "\0" not in r for r in roots):
        return None
    return roots


def record_roots(store: Any, paths: Sequence[str | os.PathLike]) -> None:
    """Add the folders of `embed` arguments `paths` to the store's recorded roots (a new version of the
    store, mlx_clap.store.Store.update_manifest). `store` is open for writing."""
    merged = merge_roots(recorded_roots(store.manifest) or [], input_roots(paths))
    if not merged or merged == store.manifest.get(ROOTS_KEY):
        return
    store.update_manifest({ROOTS_KEY: merged})


class LibraryScope:
    """Decides which row paths may be read (see the module docstring). Folders are resolved once each."""

    def __init__(self, roots: Sequence[str] | None):
        self.roots = None if roots is None else [os.path.realpath(os.path.normpath(r)) for r in roots]
        self.real: dict[str, str] = {}  # a row's folder as named -> that folder resolved

    def real_folder(self, folder: str) -> str | None:
        """`folder` with every link resolved (None when a link on the way changes as it is read)."""
        if folder not in self.real:
            try:
                self.real[folder] = os.path.realpath(folder)
            except OSError:
                return None
        return self.real[folder]

    def problem(self, path: Any) -> str | None:
        """Why the file a row names must not be read (None when it may). Without recorded roots only
        the name is checked: the caller decides what a store without roots means."""
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            return "not an absolute path"
        named = os.path.normpath(path)
        suffix = os.path.splitext(named)[1].lower()
        if suffix not in AUDIO_SUFFIXES:
            return f"not an audio file name ({suffix or 'no suffix'})"
        if self.roots is not None:
            real = self.real_folder(os.path.dirname(named))
            if real is None or not any(inside(real, r) for r in self.roots):
                return "outside the library folders the store records"
        return None


def check_rows(store_path: str | os.PathLike) -> dict[str, Any]:
    """The roots a store records and every file row that `serve` would refuse to read (read-only).

    Returns {"library_roots": [...] or None, "unsafe_rows": [{"row", "path", "cause"}], "notes": [...]}.
    Every file row of the newest version is checked."""
    from mlx_clap.store import Store

    store = Store.open(store_path)
    roots = recorded_roots(store.manifest)
    scope = LibraryScope(roots)
    unsafe = []
    for row, item in enumerate(store.items):
        cause = scope.problem(item["path"])
        if cause is not None:
            unsafe.append({"row": row, "path": item["path"], "cause": cause})
    notes = []
    if roots is None:
        notes.append(
            "the store records no library folders (made before mlx-clap recorded them): `mlx-clap serve` "
            "plays none of its files until `mlx-clap embed` runs over the library once more (nothing is "
            "embedded again)"
        )
    return {"library_roots": roots, "unsafe_rows": unsafe, "notes": notes}
