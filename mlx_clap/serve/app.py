"""The Starlette application of `mlx-clap serve`: routes from the page to the library.

    GET  /                      the page (with this session's token in a <meta> tag, unless remote)
    GET  /static/...            its script, styles and icon (served from the package: works offline)
    GET  /api/info              the store at a glance
    POST /api/search            {"text": ...} or {"row": R[, "segment": S]} ("more like this"), "k"
    POST /api/search/audio?k=   the raw bytes of a dropped sound (name in X-Filename)
    GET  /api/item/R            one file row: details and its segment times
    GET  /api/peaks/R?n=&start=&end=   waveform thumbnail
    GET  /api/map               one point per file row: x, y, cluster
    GET  /api/duplicates?threshold=    near-duplicate groups
    GET  /audio/R?t=TOKEN       the row's audio file, with byte ranges

Everything under /api and /audio needs the session token and refuses cross-site requests
(`security`); files are found by row id only, inside the library folders the store records (`media`).
Errors are JSON: {"error": "..."}; a request this cannot parse (deep nesting, numbers too long to
read, NaN) is a 400 naming the cause, never a 500.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlx_clap.search.roots import recorded_roots
from mlx_clap.serve import media, security, uploads
from mlx_clap.serve.engine import MAX_K, Library, QueryError
from mlx_clap.serve.thumbs import MAX_BUCKETS, PeakCache

STATIC = Path(__file__).resolve().parent / "static"
MAX_JSON_BODY = 64 * 1024
MAX_JSON_DIGITS = 30  # no number the API takes needs more; int() of thousands of digits is slow, then refused
DEFAULT_K = 20


class JSON(JSONResponse):
    """Compact JSON; a path that is not valid UTF-8 (lone surrogates) is sent escaped, not refused."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in [lo, hi]; QueryError 400 naming it otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # The length first: int() refuses (ValueError) a string of more than 4300 digits.
    if not raw.isascii() or not raw.isdigit() or len(raw) > len(str(hi)) or not lo <= int(raw) <= hi:
        raise QueryError(f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


def float_param(request: Request, name: str, lo: float, hi: float) -> float | None:
    """A finite float query parameter in [lo, hi] (None when absent); QueryError 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > 40:
        raise QueryError(f"{name} must be a number from {lo:g} to {hi:g}")
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name} must be a number") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise QueryError(f"{name} must be a number from {lo:g} to {hi:g}")
    return value


def body_int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    """An integer field of a JSON body (`default` when absent); QueryError 400 for any other type."""
    value = body.get(name, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise QueryError(f"{name} must be a whole number")


async def read_json(request: Request) -> dict[str, Any]:
    """A small JSON object body (at most MAX_JSON_BODY bytes)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON_BODY:
            raise QueryError("request body too large", 413)
    try:
        body = json.loads(bytes(data) or b"{}", parse_int=_json_int, parse_constant=_json_constant)
    except QueryError:
        raise
    except RecursionError:
        raise QueryError("the request body is nested too deeply") from None
    except ValueError:
        raise QueryError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise QueryError("the request body must be a JSON object")
    return body


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise QueryError(f"a number in the request body is longer than {MAX_JSON_DIGITS} digits")
    return int(text)


def _json_constant(name: str) -> float:
    raise QueryError(f"the request body holds {name}, which is not a number JSON allows")


def create_app(
    library: Library,
    *,
    token: str | None = None,
    hosts: list[str] | None = None,
    max_upload: int = uploads.MAX_UPLOAD_BYTES,
    remote: bool = False,
) -> Starlette:
    """The app for one library. `token` defaults to a fresh random one (`app.state.token`); `hosts`
    are the accepted Host names (default: the loopback names); uploads above `max_upload` get 413.

    `remote` (a bind other machines reach): the page any client can fetch does not carry the token;
    the user brings it (the URL the command prints, `#token=...`, or typed when the page asks)."""
    token = token or security.new_token()
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{TOKEN}}", "" if remote else token)
    peaks = PeakCache()
    files = media.RowFiles(library.items, recorded_roots(library.store.manifest))
    hint = security.REMOTE_TOKEN_HINT if remote else security.LOCAL_TOKEN_HINT

    def refuse(request: Request, sent: str | None) -> JSON | None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        why = security.cross_site_refusal(request.headers, own, token, sent, hint)
        return None if why is None else error(403, why)

    def api(handler):
        """A handler behind the token and origin checks, with its errors turned into JSON."""

        async def guarded(request: Request) -> Response:
            refused = refuse(request, request.headers.get(security.TOKEN_HEADER))
            if refused is not None:
                return refused
            try:
                return await handler(request)
            except (QueryError, media.MediaError, uploads.UploadError) as exc:
                return error(exc.status, str(exc))

        return guarded

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @api
    async def info(request: Request) -> Response:
        return JSON({**library.describe(), "max_upload": max_upload})

    @api
    async def search(request: Request) -> Response:
        body = await read_json(request)
        k = body_int(body, "k", DEFAULT_K)
        if "text" in body:
            if not isinstance(body["text"], str):
                raise QueryError("text must be a string")
            return JSON(await run_in_threadpool(library.text_search, body["text"], k))
        row, segment = body_int(body, "row"), body_int(body, "segment")
        if row is None:
            raise QueryError('give "text" or "row" (and optionally "segment")')
        query = library.segment_vector(row, segment) if segment is not None else library.row_vector(row)
        return JSON(await run_in_threadpool(library.search, query, k, exclude_row=row))

    @api
    async def search_audio(request: Request) -> Response:
        k = int_param(request, "k", DEFAULT_K, 1, MAX_K)
        name = request.headers.get("x-filename", "")
        with uploads.temp_folder() as folder:
            path = await uploads.save_body(
                request.stream(), folder, name, request.headers.get("content-length"), max_upload
            )
            query, notes = await run_in_threadpool(library.audio_vector, path, "the dropped file")
        found = await run_in_threadpool(library.search, query, k)
        return JSON({**found, "notes": notes + found["notes"]})

    @api
    async def item(request: Request) -> Response:
        row = media.parse_row(request.path_params["row"], len(library.items))
        return JSON(library.item(row))

    @api
    async def peaks_of(request: Request) -> Response:
        row = media.parse_row(request.path_params["row"], len(library.items))
        n = int_param(request, "n", 120, 8, MAX_BUCKETS)
        start = float_param(request, "start", 0.0, 1e7)
        end = float_param(request, "end", 0.0, 1e7)
        rate = library.items[row].get("source_rate")
        # The file's own rate (no resampling); one a decoder can always give when the row lacks it.
        rate = int(rate) if isinstance(rate, int) and 1000 <= rate <= 768_000 else 48_000
        from mlx_clap.preprocess.audio import AudioDecodeError

        opened = files.open(row)  # decoded through this descriptor where the system can name it
        try:
            st = opened.st
            key = (opened.named, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            values = await run_in_threadpool(peaks.peaks, opened.decoder_path(), key, rate, n, start, end)
        except AudioDecodeError as exc:
            raise QueryError(f"row {row}: {exc.cause}", 422) from exc
        finally:
            opened.close()
        return JSON({"row": row, "peaks": values})

    @api
    async def library_map(request: Request) -> Response:
        doc, notes = await run_in_threadpool(library.library_map)
        return JSON({**doc, "notes": notes})

    @api
    async def duplicates(request: Request) -> Response:
        threshold = float_param(request, "threshold", 0.5, 1.0)
        return JSON(await run_in_threadpool(library.duplicates, 0.97 if threshold is None else threshold))

    async def audio(request: Request) -> Response:
        # The <audio> element cannot send headers: the token comes in the URL (same page, same session).
        refused = refuse(request, request.query_params.get(security.TOKEN_PARAM))
        if refused is not None:
            return refused
        try:
            row = media.parse_row(request.path_params["row"], len(library.items))
            return files.response(row, request.headers, head_only=request.method == "HEAD")
        except media.MediaError as exc:
            return error(exc.status, str(exc))

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/search", search, methods=["POST"]),
        Route("/api/search/audio", search_audio, methods=["POST"]),
        Route("/api/item/{row}", item),
        Route("/api/peaks/{row}", peaks_of),
        Route("/api/map", library_map),
        Route("/api/duplicates", duplicates),
        Route("/audio/{row}", audio, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts or security.allowed_hosts("127.0.0.1")),
            Middleware(security.SecurityHeaders),
        ],
    )
    app.state.token = token
    app.state.library = library
    app.state.files = files
    return app
