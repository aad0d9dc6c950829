"""Atomic checkpoint files: a temporary beside the target, fsync, rename.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary lives in the system temp
folder, then moves it into place: a copy when that folder is on another filesystem, so a full disk leaves a
truncated, unreadable ``last.ckpt`` under its final name and the next resume fails. :class:`AtomicCheckpointIO`
serialises into a temporary file in the checkpoint's own folder (:func:`lensflow._util.atomic.atomic_path`),
syncs it, and renames it over the target: after any failure the previous checkpoint is still there and loads.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lensflow._util.atomic import atomic_path

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on the checkpoint's filesystem (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path``: all of it, or nothing and the previous file left as it was."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: Lightning's own way
            return
        try:
            buf = io.BytesIO()  # serialised first: a failed write is then a plain OSError, not torch's zip error
            torch.save(checkpoint, buf)
            with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
                fh.write(buf.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            if e.filename is not None or not e.errno:
                raise
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from None  # one line naming the checkpoint
