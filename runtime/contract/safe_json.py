"""Reading the small JSON files of a bundle (manifest, signature) as untrusted input: a regular
file only (never a FIFO, a device or a link to one), of bounded size, nested to a bounded depth,
with an object at the top. Everything else is one :class:`BundleError` line, before any parsing
that could hang, exhaust memory or recurse without end."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError

MAX_BYTES = 1 << 20  # 1 MiB: a manifest is about 10 KB, a signature under 1 KB
MAX_DEPTH = 32  # a manifest nests 6 deep
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def read_regular(path: Path, limit: int = MAX_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes (links followed)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise BundleError(f"{path}: {info.st_size} bytes, over the {limit} bytes allowed")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in now cannot block
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise BundleError(f"{path}: not a regular file")
            data = fh.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise BundleError(f"{path}: over the {limit} bytes allowed")
    return data


def nesting_depth(data: bytes) -> int:
    """How deep ``[`` and ``{`` nest in JSON text (brackets inside strings ignored)."""
    body = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.zeros(body.shape, dtype=np.int32)
    steps[(body == ord("[")) | (body == ord("{"))] = 1
    steps[(body == ord("]")) | (body == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def load_object(path: Path, what: str, limit: int = MAX_BYTES) -> tuple[dict[str, Any], bytes]:
    """The JSON object in ``path`` (at most ``limit`` bytes) and its bytes; :class:`BundleError` for
    anything else."""
    data = read_regular(path, limit)
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise BundleError(f"{path}: {what} nested {depth} deep, more than the {MAX_DEPTH} allowed")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: {what} must be a JSON object, not a {type(value).__name__}")
    return value, data
