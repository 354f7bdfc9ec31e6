"""Where each stream's checkpoint is kept: the changelog topic, with the state dir as its cache.

A ``StateStore`` saves and loads one checkpoint payload per stream (a partition of the
training topic); the loop calls ``save`` before it commits the stream's offsets and ``load``
before it consumes a partition it was just assigned.

* ``ChangelogStates`` (what ``spacenet serve`` uses): the changelog topic (``changelog.py``) is
  the record; each checkpoint is also written to the local cache, and a restore whose newest
  manifest matches the cached file (same SHA-256) reads the file instead of the topic. A stream
  the changelog has never seen is restored from the cache if it has one (state written before
  the changelog existed).
* ``LocalStates`` (``changelog=false``): checkpoint files under ``<state_dir>/checkpoints/
  partition-<p>`` only, for a single machine.

Both write the same bytes (``checkpoint.encode``), so a smaller payload format changes nothing here.

    >>> import tempfile
    >>> local = LocalStates(tempfile.mkdtemp())
    >>> local.save(3, model_version=1, payload={"positions": {"3": 10}})
    >>> local.load(3)["positions"], local.load(4)
    ({'3': 10}, None)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from spacenet.stream.changelog import Changelog, Head
from spacenet.stream.checkpoint import CheckpointError, CheckpointStore, decode, encode

log = logging.getLogger(__name__)


class StateStore(Protocol):
    def load(self, stream: int) -> dict[str, Any] | None:
        """The newest checkpoint payload of ``stream`` (None: it has none)."""

    def save(self, stream: int, model_version: int, payload: dict[str, Any]) -> None:
        """Keep ``payload`` as the newest checkpoint of ``stream``; raises ``CheckpointError``."""

    def size(self, stream: int) -> int:
        """Bytes of the newest checkpoint of ``stream`` this store saved or loaded (0: none)."""


class LocalStates:
    """Checkpoint files, one folder per stream, under ``root`` (``<state_dir>/checkpoints``)."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        self._sizes: dict[int, int] = {}

    def store(self, stream: int) -> CheckpointStore:
        return CheckpointStore(self.root / f"partition-{stream}", keep=self.keep)

    def load(self, stream: int) -> dict[str, Any] | None:
        store = self.store(stream)
        found = store.latest()
        for torn in store.skipped_:
            log.warning("stream %d: ignored incomplete checkpoint %s", stream, torn)
        if found is None:
            return None
        self._sizes[stream] = store.path_for(found[0]).stat().st_size
        return found[1]

    def save(self, stream: int, model_version: int, payload: dict[str, Any]) -> None:
        self.write(stream, model_version, encode(payload))

    def write(self, stream: int, model_version: int, data: bytes) -> None:
        """Keep ``encode()`` output; raises ``CheckpointError``."""
        self.store(stream).write(model_version, data)
        self._sizes[stream] = len(data)

    def size(self, stream: int) -> int:
        return self._sizes.get(stream, 0)


class ChangelogStates:
    """The changelog topic as the record, ``cache`` as a local copy (see the module doc)."""

    def __init__(self, changelog: Changelog, cache: LocalStates) -> None:
        self.changelog = changelog
        self.cache = cache
        self._heads: dict[int, Head] = {}
        self._sizes: dict[int, int] = {}

    def load(self, stream: int) -> dict[str, Any] | None:
        head = self._heads[stream] = self.changelog.head(stream)
        manifest = head.manifest
        if manifest is None:
            cached = self.cache.load(stream)
            if cached is not None:
                log.warning(
                    "stream %d: not in %s; restored from the local cache", stream, self.changelog.topic
                )
                self._sizes[stream] = self.cache.size(stream)
            return cached
        self._sizes[stream] = manifest.size
        cache = self.cache.store(stream)
        if cache.digest(manifest.model_version) == bytes.fromhex(manifest.sha256):
            try:
                payload = cache.load(manifest.model_version)
                log.info("stream %d: checkpoint %d from the local cache", stream, manifest.seq)
                return payload
            except (OSError, ValueError) as e:
                log.warning("stream %d: cached checkpoint unusable (%s); reading the changelog", stream, e)
        data = self.changelog.read(manifest)
        payload = decode(data)
        log.info(
            "stream %d: checkpoint %d (%d bytes) from %s",
            stream,
            manifest.seq,
            len(data),
            self.changelog.topic,
        )
        try:
            self.cache.write(stream, manifest.model_version, data)
        except CheckpointError as e:  # a cache: the restore stands without it
            log.warning("stream %d: could not cache its checkpoint: %s", stream, e)
        return payload

    def save(self, stream: int, model_version: int, payload: dict[str, Any]) -> None:
        data = encode(payload)
        head = self._heads.get(stream)
        if head is None:  # a stream is loaded before it is saved; this is for a caller that did not
            head = self._heads[stream] = self.changelog.head(stream)
        positions = {int(p): int(o) for p, o in payload.get("positions", {}).items()}
        self._heads[stream] = self.changelog.write(stream, data, head, model_version, positions)
        self._sizes[stream] = len(data)
        # Written after the changelog: a failure here still holds the offsets back (a full or
        # unwritable state dir also stops the task buffer from spilling).
        self.cache.write(stream, model_version, data)

    def size(self, stream: int) -> int:
        return self._sizes.get(stream, 0)
