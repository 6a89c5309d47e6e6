"""Where a store lives: a local folder or an object-store URI, and the small files kept beside its tables.

A local store is a folder (`--out vectors.lance`): Lance's own entries (`_versions/`, `data/`,
`_deletions/`, `_transactions/`, `_indices/`), plus `errors.jsonl` and `warnings.jsonl` (JSON lines,
readable as before) and `.writer.lock` (the one-writer lock, mlx_clap.search.lock). On object storage
(`s3://bucket/prefix`) the same names are objects under the prefix, written whole through pyarrow.fs.

Object-store settings come from the usual environment variables, which Lance and pyarrow read
themselves (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION);
`s3_options` only adds what they would not infer: the endpoint (AWS_ENDPOINT_URL_S3, else
AWS_ENDPOINT_URL) and `allow_http` when that endpoint is plain http.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clap.store.errors import StoreError

# Lance's entries in a dataset folder, and ours beside them.
LANCE_ENTRIES = ("_versions", "data", "_deletions", "_transactions", "_indices", "_refs")
ERRORS_NAME = "errors.jsonl"
WARNINGS_NAME = "warnings.jsonl"
LOCK_NAME = ".writer.lock"
SIDE_FILES = (ERRORS_NAME, WARNINGS_NAME, LOCK_NAME)
# Files other commands keep next to a store (cluster, ANN index, serve's map); --overwrite may remove them.
DERIVED_ENTRIES = ("clusters.json", "ann.usearch", "ann.json", "map.json")


def is_remote(target: str | os.PathLike) -> bool:
    """Whether `target` names an object store (`scheme://...`) rather than a local folder."""
    text = os.fspath(target)
    return "://" in text and not text.startswith("file://")


def s3_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Lance storage options for S3 from the environment (`environ`, by default os.environ): the
    endpoint of an S3-compatible server and `allow_http` for a plain-http one. Credentials are left to
    Lance's own lookup (environment, profile, instance role)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            out["allow_http"] = "true"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        out["aws_region"] = region
    return out


@dataclass(frozen=True)
class Location:
    """A store's address: `uri` as Lance takes it, `local` the folder for a local store (None for an
    object store), and the storage options for Lance. Picklable, so a worker can write to it."""

    uri: str
    local: Path | None
    storage_options: dict[str, str] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else self.uri

    # ------------------------------------------------------------------------- files beside the tables
    def _remote(self, what: str, fn: Any) -> Any:
        """Run an object-store call; its failure becomes a StoreError naming the store and the cause."""
        try:
            return fn()
        except OSError as exc:
            from mlx_clap.store.errors import lance_failure

            raise StoreError(f"{self}: cannot {what}: {lance_failure(exc)}") from exc

    def _fs(self) -> tuple[Any, str]:
        """pyarrow FileSystem and base path of an object-store location."""
        import pyarrow.fs as pafs

        scheme, _, rest = self.uri.partition("://")
        opts = self.storage_options or {}
        if scheme in ("s3", "s3a"):
            endpoint = opts.get("aws_endpoint")
            kwargs: dict[str, Any] = {"allow_bucket_creation": False}
            if endpoint:
                scheme_of, _, host = endpoint.partition("://")
                kwargs["endpoint_override"] = host.rstrip("/")
                kwargs["scheme"] = scheme_of or "https"
            if opts.get("aws_region"):
                kwargs["region"] = opts["aws_region"]
            return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
        fs, path = pafs.FileSystem.from_uri(self.uri)
        return fs, path.rstrip("/")

    def read_side(self, name: str) -> bytes | None:
        """The bytes of side file `name` (None when it does not exist)."""
        if self.local is not None:
            p = self.local / name
            if p.is_symlink():
                raise StoreError(f"{p}: is a symbolic link; a store's files must be its own")
            try:
                return p.read_bytes()
            except FileNotFoundError:
                return None
        import pyarrow.fs as pafs

        fs, base = self._fs()

        def read() -> bytes | None:
            if fs.get_file_info(f"{base}/{name}").type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(f"{base}/{name}") as fh:
                return fh.read()

        return self._remote(f"read {name}", read)

    def write_side(self, name: str, data: bytes) -> None:
        """Replace side file `name` whole (a rename locally, so never through a symbolic link; one PUT on
        an object store)."""
        if self.local is not None:
            from mlx_clap.io.files import atomic_write_bytes

            atomic_write_bytes(self.local / name, data)
            return
        fs, base = self._fs()

        def write() -> None:
            with fs.open_output_stream(f"{base}/{name}") as fh:
                fh.write(data)

        self._remote(f"write {name}", write)

    def append_side(self, name: str, records: list[dict]) -> None:
        """Append JSON lines to side file `name`: one write + fsync locally (O_NOFOLLOW), a rewrite of the
        whole object on an object store (which has no append)."""
        if not records:
            return
        if self.local is not None:
            from mlx_clap.io.files import append_lines

            append_lines(self.local / name, records)
            return
        old = self.read_side(name) or b""
        if old and not old.endswith(b"\n"):
            old = old[: old.rfind(b"\n") + 1]  # a torn last line
        self.write_side(name, old + lines(records))

    def read_records(self, name: str) -> list[dict]:
        """The JSON-object lines of side file `name` (a torn or bad line is skipped)."""
        raw = self.read_side(name) or b""
        out = []
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def remove_side(self, name: str) -> None:
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        fs, base = self._fs()

        def remove() -> None:
            if fs.get_file_info(f"{base}/{name}").type != pafs.FileType.NotFound:
                fs.delete_file(f"{base}/{name}")

        self._remote(f"remove {name}", remove)

    def side(self, name: str) -> SideFile:
        """Side file `name` of this store, as one object a command can read and replace."""
        return SideFile(self, name)

    # ------------------------------------------------------------------------------------- listing
    def names(self) -> list[str]:
        """The entries directly under the store (empty when it does not exist)."""
        if self.local is not None:
            try:
                return sorted(p.name for p in self.local.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        fs, base = self._fs()
        infos = self._remote(
            "list the store", lambda: fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        )
        return sorted(i.base_name for i in infos)

    def missing_bucket(self) -> str | None:
        """The bucket (or container) of an object-store URI when it does not exist, else None: an empty
        listing under a missing bucket would otherwise read as "no store here"."""
        if self.local is None:
            import pyarrow.fs as pafs

            fs, base = self._fs()
            bucket = base.split("/", 1)[0]
            try:
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    return bucket
            except OSError:
                return None  # unreachable or refused: the caller's own error says which
        return None

    def version_files(self) -> list[str]:
        """The manifest file names under `_versions/` (each a committed version)."""
        if self.local is not None:
            try:
                return sorted(
                    p.name for p in (self.local / "_versions").iterdir() if p.name.endswith(".manifest")
                )
            except (FileNotFoundError, NotADirectoryError):
                return []
        import pyarrow.fs as pafs

        fs, base = self._fs()
        selector = pafs.FileSelector(f"{base}/_versions", allow_not_found=True)
        infos = self._remote("list the store's versions", lambda: fs.get_file_info(selector))
        return sorted(i.base_name for i in infos if i.base_name.endswith(".manifest"))


@dataclass(frozen=True)
class SideFile:
    """One file beside a store's tables (errors.jsonl, warnings.jsonl, clusters.json, map.json), local or
    on an object store: what a command reads and rewrites whole. `str()` names it for messages."""

    location: Location
    name: str

    def __str__(self) -> str:
        if self.location.local is not None:
            return str(self.location.local / self.name)
        return f"{self.location.uri}/{self.name}"

    def read_records(self) -> list[dict]:
        """Its JSON-object lines (none when it is missing; a torn or bad line is skipped)."""
        return self.location.read_records(self.name)

    def rewrite(self, records: list[dict]) -> None:
        """Replace it with `records` as JSON lines (removed when there are none)."""
        if records:
            self.location.write_side(self.name, lines(records))
        else:
            self.location.remove_side(self.name)

    def append(self, records: list[dict]) -> None:
        self.location.append_side(self.name, records)

    def read_json(self) -> Any:
        """Its JSON document, or None when it is missing or not JSON (a cache made again)."""
        raw = self.location.read_side(self.name)
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            return None

    def write_json(self, doc: Any, compact: bool = False) -> None:
        """Replace it with `doc` (indented, or `compact` for large documents), whole."""
        text = json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=1)
        self.location.write_side(self.name, text.encode("utf-8"))


def location_of(store: Any) -> Location:
    """The Location of an open store (its `location`), or of whatever a `store.path` names."""
    loc = getattr(store, "location", None)
    return loc if isinstance(loc, Location) else locate(store.path)


def lines(records: Iterable[dict]) -> bytes:
    from mlx_clap.io.files import json_line

    return "".join(json_line(r) for r in records).encode("utf-8")


def locate(
    target: str | os.PathLike,
    storage_options: dict[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Location:
    """The Location of a store named by a folder or a URI. A local folder given as a symbolic link is
    followed once here (the store is written where it points, never through a link inside it)."""
    text = os.fspath(target)
    if is_remote(text):
        scheme = text.partition("://")[0].lower()
        opts = dict(s3_options(environ)) if scheme in ("s3", "s3a") else {}
        opts.update(storage_options or {})
        return Location(text.rstrip("/"), None, opts or None)
    if text.startswith("file://"):
        text = text[len("file://") :]
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    return Location(str(path), path, storage_options)


def check_entries(loc: Location) -> None:
    """StoreError when an entry of a local store (Lance's folders, our side files) is a symbolic link or
    resolves outside the store: a write there would change files outside it."""
    if loc.local is None:
        return
    root = os.path.realpath(loc.local)
    for name in (*LANCE_ENTRIES, *SIDE_FILES):
        p = loc.local / name
        if p.is_symlink():
            raise StoreError(
                f"{p}: is a symbolic link (to {os.readlink(p)}); a store's files must be its own. "
                "Replace the link with the real file or folder"
            )
        if p.exists() and os.path.commonpath([root, os.path.realpath(p)]) != root:
            raise StoreError(f"{p}: resolves outside the store folder {loc.local}; refusing to use it")


def remove_lance_leftovers(loc: Location) -> None:
    """Remove Lance folders that no version names: a creation or migration killed before its first
    commit (call only where no version exists)."""
    if loc.local is None:
        return
    import shutil

    for name in LANCE_ENTRIES:
        p = loc.local / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
