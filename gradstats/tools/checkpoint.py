"""Checkpoint files that are written atomically and verified before anything is loaded.

A file is one header line and the torch.save payload:
    GRADSTATS-CHECKPOINT 1 sha256=<64 hex digits> bytes=<payload length>\\n<payload>
save_checkpoint writes it to a temporary file in the target's folder, flushes and fsyncs it,
then renames it over the target (and fsyncs the folder), so a crash leaves either the old file
or the new one, never a mixture. load_checkpoint checks the header, the payload length
(truncation) and the checksum (corruption) before unpickling, and unpickles with
torch.load(weights_only=True): tensors and plain Python values only.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import torch

from .safe_files import replace_in

MAGIC = b"GRADSTATS-CHECKPOINT"
VERSION = 1
_MAX_HEADER = 256


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or not a gradstats checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Writes ``state`` (tensors and plain Python values) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    header = f"{MAGIC.decode()} {VERSION} sha256={digest} bytes={len(payload)}\n".encode()
    folder = os.path.dirname(os.path.abspath(path))

    def write(f) -> None:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())

    # A temporary file in the folder renamed over the target: a crash leaves the old file or the
    # new one, and a link planted at the target's name is replaced, not followed.
    replace_in(folder, os.path.basename(path), write, binary=True)
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved by save_checkpoint at ``path``; CheckpointError (saying what is wrong) if
    the file is missing, not a gradstats checkpoint, truncated or corrupted."""
    try:
        with open(path, "rb") as f:
            header = f.readline(_MAX_HEADER)
            payload = f.read()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from error
    fields = header.split()
    if len(fields) != 4 or fields[0] != MAGIC or not header.endswith(b"\n"):
        raise CheckpointError(f"{path}: not a gradstats checkpoint (no '{MAGIC.decode()}' header line)")
    try:
        version = int(fields[1])
        digest = fields[2].removeprefix(b"sha256=").decode()
        length = int(fields[3].removeprefix(b"bytes="))
    except ValueError as error:
        raise CheckpointError(f"{path}: malformed checkpoint header {header[:80]!r}") from error
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}; this gradstats reads format {VERSION}")
    if len(payload) < length:
        raise CheckpointError(
            f"{path}: truncated checkpoint: {len(payload)} of {length} payload bytes present"
        )
    if len(payload) > length:
        raise CheckpointError(
            f"{path}: corrupted checkpoint: {len(payload) - length} bytes beyond the payload"
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: corrupted checkpoint: the payload's sha256 does not match its header")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # the checksum matched, so this was written that way
        raise CheckpointError(
            f"{path}: checkpoint payload does not load ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint holds a {type(state).__name__}, expected a dict")
    return state
