"""`check_store`: read every row of a store the way the commands do and list what is wrong;
`repair_store`: drop what was found, never anything else.

Found: a newest version that cannot be read (a damaged manifest: the previous readable one is checked
and named), fragments whose data or deletion files are missing or unreadable, rows whose checksum
(schema.row_checksums) does not match, vectors with NaN/Inf or not of unit length, a path with two file
rows, segment rows whose (path, sha256) matches no file row, and file rows of a segment store without
segments. Listed but not damage: rows whose file on disk is missing or changed since it was embedded
("stale_rows"; the next embed over that folder brings them up to date).

A repair drops rows and never moves one: every row of a path with any damaged row is deleted (file and
segment rows, so the next embed redoes the file whole), unreadable fragments are removed whole, all in
one commit; a damaged newest manifest is renamed aside (`*.manifest.damaged`), which makes the previous
version the newest.
"""

from __future__ import annotations

import os
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlx_clap.store.dataset import _LANCE_ERRORS, _open_dataset, _versions_of, commit_operation
from mlx_clap.store.errors import StoreError, lance_failure
from mlx_clap.store.location import Location, locate
from mlx_clap.store.schema import (
    FILE,
    META_COLUMNS,
    SEGMENT,
    UNIT_TOLERANCE,
    VECTOR,
    key_path,
    keys_of,
    manifest_of,
    path_key,
    row_checksums,
    vectors_of,
)

CHECK_BATCH = 16384


def check_store(
    target: str | os.PathLike | Location, *, files: bool = True, storage_options: dict[str, str] | None = None
) -> dict[str, Any]:
    """Verify every row of the newest readable version; read-only. With `files`, compare each file row
    with its file (missing, other size or mtime). StoreError only when no version can be read at all."""
    loc = target if isinstance(target, Location) else locate(target, storage_options)
    unreadable: list[dict] = []
    ds = None
    for v in [None, *sorted(_versions_of(loc), reverse=True)[1:6]]:
        try:
            ds = _open_dataset(loc, v)
            break
        except StoreError as exc:
            if v is None and not loc.version_files():
                raise
            unreadable.append({"version": v if v is not None else max(_versions_of(loc)), "cause": str(exc)})
    if ds is None:
        raise StoreError(f"{loc}: no version of the store can be read ({unreadable[0]['cause']})")
    manifest = manifest_of(ds.schema, str(loc))
    dim = int(manifest["store"]["dim"])
    damaged: list[dict] = []
    bad_fragments: list[dict] = []
    tables = []
    for frag in ds.get_fragments():
        table, problem = _read_fragment(frag, dim)
        if problem is not None:
            bad_fragments.append(problem)
        else:
            tables.append(table)
            damaged += _row_damage(table, dim)
    meta = pa.concat_tables(tables) if tables else None
    damaged += _consistency(meta, manifest)
    stale = _stale_rows(meta) if files and meta is not None else []
    notes = []
    if unreadable:
        notes.append(
            f"the newest version(s) {', '.join(str(u['version']) for u in unreadable)} cannot be read; "
            f"checked version {ds.version} (--repair sets the damaged ones aside)"
        )
    if stale:
        notes.append(
            f"{len(stale)} row(s) describe files that are gone or changed since; embed again to update"
        )
    n_files = 0 if meta is None else int(pc.sum(pc.equal(meta.column("kind"), FILE)).as_py() or 0)
    n_seg = 0 if meta is None else int(meta.num_rows - n_files)
    damaged.sort(key=lambda d: d["address"])
    return {
        "store": str(loc),
        "version": int(ds.version),
        "items": n_files,
        "segments": n_seg,
        "damaged_rows": damaged,
        "damaged_fragments": bad_fragments,
        "unreadable_versions": unreadable,
        "bad_lines": [],  # the older format's items.jsonl lines; kept so reports read alike
        "orphan_rows": sum(1 for d in damaged if d["cause"].startswith("segment of no file row")),
        "stale_rows": stale,
        "notes": notes,
        "ok": not damaged and not bad_fragments and not unreadable,
    }


def _read_fragment(frag: Any, dim: int) -> tuple[pa.Table | None, dict | None]:
    """A fragment's rows (metadata, with each row's own checks done) or why it cannot be read."""
    rows = []
    try:
        for batch in frag.to_batches(
            columns=[*META_COLUMNS, VECTOR], with_row_address=True, batch_size=CHECK_BATCH
        ):
            rows.append(batch)
    except _LANCE_ERRORS as exc:
        paths = None
        try:  # name the files that lose their rows, when at least the path column can be read
            t = frag.to_table(columns=["path", "path_raw"])
            paths = sorted({key_path(k) for k in keys_of(t)})
        except _LANCE_ERRORS:
            pass
        try:
            n = int(frag.count_rows())
        except _LANCE_ERRORS:
            n = int(frag.metadata.physical_rows)
        return None, {
            "fragment": int(frag.fragment_id),
            "rows": n,
            "paths": paths,
            "cause": f"unreadable data ({lance_failure(exc)})",
        }
    return (pa.Table.from_batches(rows) if rows else None), None


def _row_damage(table: pa.Table | None, dim: int) -> list[dict]:
    if table is None or table.num_rows == 0:
        return []
    vecs = vectors_of(table.column(VECTOR), dim)
    keys = keys_of(table)
    kinds = table.column("kind").to_pylist()
    starts = table.column("start").to_pylist()
    ends = table.column("end").to_pylist()
    sums = table.column("checksum").to_numpy(zero_copy_only=False)
    ok_sum = row_checksums(keys, kinds, starts, ends, vecs) == sums
    f32 = vecs.astype(np.float32)
    finite = np.all(np.isfinite(f32), axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(np.where(np.isfinite(f32), f32, 0.0), axis=1)
    addr = table.column("_rowaddr").to_numpy()
    out = []
    for i in np.nonzero(~ok_sum | ~finite | (np.abs(norms - 1.0) > UNIT_TOLERANCE))[0]:
        if not finite[i]:
            cause = "NaN or Inf values"
        elif not ok_sum[i]:
            cause = "checksum mismatch (the row's path or vector changed on disk)"
        else:
            cause = f"not a unit vector (norm {norms[i]:.4g})"
        out.append(_row(keys[i], kinds[i], starts[i], addr[i], cause))
    return out


def _row(key: bytes, kind: str, start: Any, address: Any, cause: str) -> dict:
    return {"path": key_path(key), "kind": kind, "start": start, "address": int(address), "cause": cause}


def _consistency(meta: pa.Table | None, manifest: dict) -> list[dict]:
    """Rows that disagree with each other: a path with two file rows, segments of no file row, file rows
    of a segment store without segments."""
    if meta is None or meta.num_rows == 0:
        return []
    keys = keys_of(meta)
    kinds = meta.column("kind").to_pylist()
    shas = meta.column("sha256").to_pylist()
    starts = meta.column("start").to_pylist()
    addr = meta.column("_rowaddr").to_numpy()
    files: dict[bytes, list[int]] = {}
    for i, (k, kind) in enumerate(zip(keys, kinds, strict=True)):
        if kind == FILE:
            files.setdefault(k, []).append(i)
    out = []
    for rows in files.values():
        if len(rows) > 1:
            out += [_row(keys[i], FILE, None, addr[i], "the path has more than one file row") for i in rows]
    file_sha = {k: shas[rows[0]] for k, rows in files.items()}
    with_segments = set()
    for i, (k, kind) in enumerate(zip(keys, kinds, strict=True)):
        if kind != SEGMENT:
            continue
        if k not in file_sha or file_sha[k] != shas[i]:
            out.append(_row(k, SEGMENT, starts[i], addr[i], "segment of no file row (path, sha256)"))
        else:
            with_segments.add(k)
    if manifest["store"].get("segments"):
        for k, rows in files.items():
            if k not in with_segments:
                out += [
                    _row(k, FILE, None, addr[i], "file row without segments in a segment store") for i in rows
                ]
    return out


def _stale_rows(meta: pa.Table) -> list[dict]:
    """File rows whose local file is gone, or has another size or mtime than recorded."""
    files = meta.filter(pc.equal(meta.column("kind"), FILE))
    out = []
    sizes = files.column("size").to_pylist()
    mtimes = files.column("mtime").to_pylist()
    for key, size, mtime in zip(keys_of(files), sizes, mtimes, strict=True):
        path = key_path(key)
        if not os.path.isabs(path):
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append({"path": path, "cause": "file missing"})
            continue
        except OSError:
            continue
        if st.st_size != size or st.st_mtime != mtime:
            out.append({"path": path, "cause": "file changed since it was embedded (size or mtime)"})
    return out


def repair_store(target: str | os.PathLike | Location, report: dict[str, Any]) -> int:
    """Drop what `report` (a `check_store` of this store) found, under the writer lock and in one commit;
    returns the number of rows removed (rows of removed fragments included). StoreError when the store
    changed since it was checked."""
    from mlx_clap.search import lock as _lock
    from mlx_clap.store.errors import StoreBusyError
    from mlx_clap.store.location import check_entries

    loc = target if isinstance(target, Location) else locate(target)
    if loc.local is not None:
        check_entries(loc)
        try:
            _lock.acquire(loc.local)
        except _lock.StoreLockedError as exc:
            raise StoreBusyError(str(exc)) from None
    try:
        if report["unreadable_versions"]:
            _set_aside(loc, [u["version"] for u in report["unreadable_versions"]])
        fresh = check_store(loc, files=False)
        keys = ("version", "damaged_rows", "damaged_fragments")
        if any(fresh[k] != report[k] for k in keys) or fresh["unreadable_versions"]:
            raise StoreError(f"{loc}: the store changed since it was checked; run check again")
        return _repair_locked(loc, fresh)
    finally:
        if loc.local is not None:
            _lock.release(loc.local)


def _repair_locked(loc: Location, report: dict[str, Any]) -> int:
    drop_frags = {d["fragment"] for d in report["damaged_fragments"]}
    if not report["damaged_rows"] and not drop_frags:
        return 0
    paths = {d["path"] for d in report["damaged_rows"]}
    for d in report["damaged_fragments"]:
        paths |= set(d["paths"] or ())
    ds = _open_dataset(loc, report["version"])
    removed_rows = sum(d["rows"] for d in report["damaged_fragments"])
    updated, removed = [], sorted(drop_frags)
    value_set = pa.array([path_key(p) for p in paths], type=pa.binary())
    damaged_addr = np.array(sorted({d["address"] for d in report["damaged_rows"]}), dtype=np.uint64)
    for frag in ds.get_fragments():
        if frag.fragment_id in drop_frags:
            continue
        t = frag.to_table(columns=["path", "path_raw"], with_row_address=True)
        keys = pc.coalesce(t.column("path_raw"), pc.cast(t.column("path"), pa.binary()))
        addr = t.column("_rowaddr").to_numpy()
        hit = pc.is_in(keys, value_set=value_set).to_numpy(zero_copy_only=False) | np.isin(addr, damaged_addr)
        if not hit.any():
            continue
        offsets = (addr[hit] & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist()
        removed_rows += len(offsets)
        new = frag.delete_rows(offsets)
        if new is None:
            removed.append(int(frag.fragment_id))
        else:
            updated.append(new)
    op = lance.LanceOperation.Update(
        removed_fragment_ids=removed, updated_fragments=updated, new_fragments=[]
    )
    try:
        commit_operation(loc, ds, op)
    except _LANCE_ERRORS as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{loc}: cannot repair the store: {lance_failure(exc)}") from exc
    return removed_rows


def _set_aside(loc: Location, versions: list[int]) -> None:
    """Rename the manifests of unreadable versions to *.manifest.damaged (kept, but no longer a version)."""
    for name in loc.version_files():
        stem = name[: -len(".manifest")]
        n = int(stem) if stem.isdigit() else -1
        v = (2**64 - 1) - n if n > 2**63 else n
        if v not in versions:
            continue
        if loc.local is not None:
            p = loc.local / "_versions" / name
            os.replace(p, p.with_name(name + ".damaged"))
        else:
            fs, base = loc._fs()
            fs.move(f"{base}/_versions/{name}", f"{base}/_versions/{name}.damaged")
    if loc.local is not None:
        # Lance's hint of the newest version would point at the one set aside.
        (loc.local / "_versions" / "latest_version_hint.json").unlink(missing_ok=True)
