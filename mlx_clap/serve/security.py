"""What keeps the local page local: allowed hosts, a per-session token, same-origin checks, headers.

- Host: requests must name an allowed host (127.0.0.1, localhost, ::1 by default), which stops a DNS
  rebinding page from talking to the server under its own name (Starlette's TrustedHostMiddleware).
- Token: the server makes a random token at start and writes it into the page it serves. Every API
  request sends it in a header (the audio player in the URL); a page on another site cannot read it,
  since the browser does not let it read our pages. With --allow-remote the page is not written with
  it (any client that reaches the port could fetch the page): the user brings the token, given with
  --token / MLX_CLAP_SERVE_TOKEN or printed by the command in the URL's fragment (`#token=...`,
  which browsers never send), and the page takes it from there or asks for it.
- Origin: a request that the browser marks as cross-site (Sec-Fetch-Site) or whose Origin is not this
  server is refused as well, before anything is parsed.
- Headers: a strict Content-Security-Policy (default-src 'self': no CDN, no inline script),
  Cross-Origin-Resource-Policy same-origin (other sites cannot embed our audio), nosniff, no framing.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Any

TOKEN_HEADER = "x-mlx-clap-token"
TOKEN_PARAM = "t"
MIN_TOKEN_CHARS = 16  # a user-given token; generated ones have 32 (192 bits)
LOCAL_TOKEN_HINT = "reload the page"
REMOTE_TOKEN_HINT = (
    "open the URL that `mlx-clap serve` printed (with #token=...), or enter the token it was given"
)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CSP = (
    "default-src 'self'; img-src 'self' data:; media-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def new_token() -> str:
    """A fresh session token (192 random bits)."""
    return secrets.token_urlsafe(24)


def token_problem(token: str) -> str | None:
    """Why a user-given token is refused (None when it will do): too short to resist guessing, or
    characters that do not travel unchanged in a header and a URL."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"is shorter than {MIN_TOKEN_CHARS} characters"
    if not token.isascii() or not all(c.isalnum() or c in "-._~" for c in token):
        return "may hold only letters, digits and - . _ ~"
    return None


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def allowed_hosts(host: str) -> list[str]:
    """Host header values to accept when bound to `host`: the loopback names, plus `host` itself
    for a remote bind ("*" for a wildcard bind, whose clients may use any of the machine's names)."""
    if is_loopback(host):
        return list(LOCAL_HOSTS) + ["[::1]"]
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return list(LOCAL_HOSTS) + ["[::1]", host, f"[{host}]"]


def cross_site_refusal(
    headers: Any, own_origin: str, token: str, sent_token: str | None, hint: str = LOCAL_TOKEN_HINT
) -> str | None:
    """Why a request must be refused (None when it may go on): marked cross-site by the browser, from
    another origin, or without this session's token (`hint` says how to get it)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is not None and origin != own_origin:
        return "cross-site request refused (the Origin is not this server)"
    if not sent_token or not hmac.compare_digest(sent_token.encode(), token.encode()):
        return f"missing or wrong session token; {hint}"
    return None


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response (unless a route set its own)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
