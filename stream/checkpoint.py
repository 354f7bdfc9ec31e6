"""Atomic, checksummed checkpoints that load without executing pickled code.

One checkpoint is one file ``ckpt-<version>.pt``: a ``torch.save`` payload (tensors,
numbers, strings, lists and dicts only) followed by a 40-byte footer, the magic
``SNCK`` + format version and the payload's SHA-256 (``encode``; ``decode`` verifies and
loads; the changelog topic carries the same bytes). It is written to a temporary
name, flushed and fsynced, then renamed into place (and the directory fsynced), so
a crash leaves either the previous state or the new one. A torn or altered file
fails its checksum and is skipped with a warning: ``latest()`` falls back to the
newest complete checkpoint. Loading uses ``torch.load(weights_only=True)``.

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> _ = store.save(1, {"offsets": {"0": 42}})
    >>> store.latest()[0], store.latest()[1]["offsets"]
    (1, {'0': 42})
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from spacenet.stream.faults import maybe_crash

log = logging.getLogger(__name__)
MAGIC = b"SNCK"
FORMAT = 1
FOOTER = struct.Struct(">4sI32s")  # magic, format, sha256 of the payload
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable directory, ...)."""


class CheckpointStore:
    """Numbered checkpoints in ``directory``; the newest ``keep`` are kept."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.skipped_: list[Path] = []

    def path_for(self, version: int) -> Path:
        return self.directory / f"ckpt-{version:08d}.pt"

    def save(self, version: int, payload: dict[str, Any]) -> Path:
        """Write ``payload`` as checkpoint ``version``; raises ``CheckpointError``."""
        return self.write(version, encode(payload))

    def write(self, version: int, data: bytes) -> Path:
        """Write ``encode()`` output as checkpoint ``version``; raises ``CheckpointError``."""
        body, footer = data[: -FOOTER.size], data[-FOOTER.size :]
        final = self.path_for(version)
        tmp = final.with_name(final.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                half = len(body) // 2
                f.write(body[:half])
                maybe_crash("checkpoint_mid_write", f)
                f.write(body[half:])
                f.write(footer)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise CheckpointError(f"writing checkpoint {final} failed: {e}") from e
        self._prune()
        return final

    def versions(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, version: int) -> dict[str, Any]:
        """Read and verify one checkpoint; ``ValueError`` if it is torn or altered."""
        return decode(self.path_for(version).read_bytes())

    def digest(self, version: int) -> bytes | None:
        """The SHA-256 its footer claims for checkpoint ``version`` (None: no such file or
        no footer), read without loading it: enough to tell whether it is a given payload."""
        try:
            with open(self.path_for(version), "rb") as f:
                f.seek(-FOOTER.size, os.SEEK_END)
                magic, fmt, digest = FOOTER.unpack(f.read(FOOTER.size))
        except (OSError, struct.error):
            return None
        return bytes(digest) if magic == MAGIC and fmt == FORMAT else None

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that verifies, or None when there is none."""
        for version in reversed(self.versions()):
            try:
                return version, self.load(version)
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("skipping checkpoint %s: %s", self.path_for(version), e)
                self.skipped_.append(self.path_for(version))
        return None

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            self.path_for(version).unlink(missing_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)


def encode(payload: dict[str, Any]) -> bytes:
    """``payload`` as checkpoint bytes: the ``torch.save`` body, then the footer with its SHA-256."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return body + FOOTER.pack(MAGIC, FORMAT, hashlib.sha256(body).digest())


def digest_of(data: bytes) -> bytes:
    """The SHA-256 the footer of ``encode()`` output carries."""
    return bytes(FOOTER.unpack(data[-FOOTER.size :])[2])


def decode(data: bytes) -> dict[str, Any]:
    """Verify and load ``encode()`` output; ``ValueError`` if it is torn or altered."""
    if len(data) < FOOTER.size:
        raise ValueError("shorter than its footer")
    magic, fmt, digest = FOOTER.unpack(data[-FOOTER.size :])
    body = data[: -FOOTER.size]
    if magic != MAGIC or fmt != FORMAT:
        raise ValueError("no checkpoint footer (torn write?)")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (torn or altered)")
    try:
        payload: dict[str, Any] = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ValueError(f"refused to load (not plain tensors and containers): {e}") from e
    return payload


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
