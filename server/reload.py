"""The served engine and its hot reload.

EngineHolder is the one reference to the engine being served. Work leases it for the length
of a batch; a swap only redirects later leases, so in-flight work finishes on the old
engine, which is closed when its last lease ends. Reloader watches ROOT/CURRENT (polling,
and on request, e.g. SIGHUP), opens and verifies a newly published version in the
background and swaps it in; a version that fails keeps the old one serving and leaves the
reason in `status()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.errors import InfluenceIndexError
from indexer.publish import read_current

if TYPE_CHECKING:
    from indexer.engine import QueryEngine

log = logging.getLogger(__name__)

EngineOpener = Callable[[Path, "QueryEngine | None"], "QueryEngine"]
"""Opens and verifies ROOT's published version; the second argument is the engine served
now, whose model may be reused."""


class NoEngineError(Exception):
    """No index version is loaded (yet, or any more)."""


class _Slot:
    def __init__(self, engine: QueryEngine) -> None:
        self.engine = engine
        self.users = 0
        self.retired = False


class EngineHolder:
    """Atomic reference to the served engine, with per-lease reference counting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slot: _Slot | None = None

    @property
    def current(self) -> QueryEngine | None:
        """The engine new leases get; for reading its info, not for computing."""
        with self._lock:
            return self._slot.engine if self._slot else None

    @contextmanager
    def lease(self) -> Iterator[QueryEngine]:
        """Hold the current engine open for the body; raises NoEngineError if there is none."""
        with self._lock:
            slot = self._slot
            if slot is None:
                raise NoEngineError("no index version is loaded; see GetIndexInfo for why")
            slot.users += 1
        try:
            yield slot.engine
        finally:
            self._release(slot)

    def swap(self, engine: QueryEngine | None) -> None:
        """Serve `engine` from now on (None: serve nothing); retire the previous one."""
        with self._lock:
            old, self._slot = self._slot, _Slot(engine) if engine is not None else None
            if old is None:
                return
            old.retired = True
            idle = old.users == 0
        if idle:
            _close(old.engine)

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            last = slot.retired and slot.users == 0
        if last:
            _close(slot.engine)


def _close(engine: QueryEngine) -> None:
    try:
        engine.close()
    except Exception:
        log.exception("closing index version %s failed", engine.version)
    else:
        log.info("closed index version %s", engine.version)


@dataclass(frozen=True)
class ReloadStatus:
    """`last_error`: why the latest load failed ('' after a success).
    `pending_version`: the version being loaded now ('' if none)."""

    last_error: str = ""
    pending_version: str = ""


class Reloader:
    """Loads ROOT's published version into an EngineHolder, now and whenever CURRENT changes."""

    def __init__(
        self,
        root: Path,
        holder: EngineHolder,
        opener: EngineOpener,
        *,
        poll_seconds: float,
        on_swap: Callable[[str], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._root = root
        self._holder = holder
        self._opener = opener
        self._poll_seconds = poll_seconds
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._status = ReloadStatus()
        self._status_lock = threading.Lock()
        self._failed_version: str | None = None
        self._forced = False
        self._stopping = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-reloader", daemon=True)

    def start(self) -> None:
        """Load the published version in the background, then keep watching."""
        self._thread.start()

    def request_reload(self) -> None:
        """Check CURRENT now, retrying a version that failed before. Safe in a signal handler."""
        self._forced = True
        self._wake.set()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop watching; waits for a load in progress (seconds)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def status(self) -> ReloadStatus:
        with self._status_lock:
            return self._status

    def check_once(self) -> None:
        """Load and swap in CURRENT's version if it is new (and not known to be bad)."""
        forced, self._forced = self._forced, False
        target = read_current(self._root)
        if target is None:
            if self._holder.current is None:
                self._set_status(
                    ReloadStatus(f"nothing published yet: {self._root}/CURRENT is missing")
                )
            return
        served = self._holder.current
        if served is not None and served.version == target:
            return
        if target == self._failed_version and not forced:
            return
        self._load(target, served)

    def _load(self, target: str, served: QueryEngine | None) -> None:
        self._set_status(ReloadStatus(self.status().last_error, pending_version=target))
        log.info("loading index version %s from %s", target, self._root)
        try:
            engine = self._opener(self._root, served)
        except Exception as exc:
            self._refuse(target, served, exc)
            return
        self._failed_version = None
        self._holder.swap(engine)
        self._set_status(ReloadStatus())
        log.info("now serving index version %s", engine.version)
        if self._on_swap is not None:
            self._on_swap(engine.version)

    def _refuse(self, target: str, served: QueryEngine | None, exc: Exception) -> None:
        self._failed_version = target
        expected = isinstance(exc, InfluenceIndexError)
        detail = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        reason = f"version {target} refused: {detail}"
        self._set_status(ReloadStatus(reason))
        still = served.version if served else "nothing"
        # A verification failure is explained by its message; anything else is a bug to trace.
        log.error("%s; still serving %s", reason, still, exc_info=None if expected else exc)
        if self._on_failure is not None:
            self._on_failure()

    def _set_status(self, status: ReloadStatus) -> None:
        with self._status_lock:
            self._status = status

    def _run(self) -> None:
        while not self._stopping:
            # Cleared before the check so that a request arriving during it is not lost.
            self._wake.clear()
            try:
                self.check_once()
            except Exception:
                # A transient filesystem error must not end the watcher: the next poll retries.
                log.exception("checking %s/CURRENT failed", self._root)
            self._wake.wait(self._poll_seconds)
