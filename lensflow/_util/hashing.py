"""Content hashes: of files (checkpoint identity) and of JSON-able objects (config identity)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["hash_json", "sha256_file"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(obj: Any, length: int | None = None) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys, compact), optionally cut to ``length``.

    Equal objects however written (key order, whitespace) give equal hashes; non-JSON leaves are
    hashed through ``str``.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return digest if length is None else digest[:length]
