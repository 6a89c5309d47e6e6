"""The STORE argument of every store command: a local folder or an object-store URI.

Its own small module, so a command's decorators do not import numpy or the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


class StoreTarget(click.ParamType):
    """A STORE argument: a local folder (a Path, `~` expanded) or an object-store URI such as
    `s3://bucket/prefix`, kept as the str it is (a Path would fold `s3://` into `s3:/`)."""

    name = "store"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        text = str(value)
        if not text:
            self.fail("an empty STORE (give a folder or an s3:// URI)", param, ctx)
        if text.startswith("file://"):
            return Path(text[len("file://") :]).expanduser()
        if "://" in text:  # store.location.is_remote's rule, without importing the store (and Lance) here
            scheme = text.partition("://")[0].lower()
            if scheme not in REMOTE_SCHEMES:
                self.fail(
                    f"{text}: unsupported scheme {scheme}:// (one of {', '.join(REMOTE_SCHEMES)})", param, ctx
                )
            return text.rstrip("/")
        return Path(text).expanduser()


# Object stores Lance reaches with credentials and an endpoint from the environment (see store/location.py).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "memory")
STORE = StoreTarget()
