"""The served engine and its hot reload.

EngineHolder is the one reference to the engine being served. Work leases it for the length
of a batch; a swap only redirects later leases, so in-flight work finishes on the old
engine, which is closed when its last lease ends. Reloader watches ROOT (polling, and on
request, e.g. SIGHUP) for the version to serve, opens and verifies it in the background and
swaps it in; a version that fails keeps the old one serving, is retried with backoff, and
leaves the reason in `status()`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.errors import InfluenceIndexError, UnavailableError
from indexer.publish import (
    CURRENT,
    PINNED,
    VERSIONS,
    Pointers,
    read_current,
    read_pinned,
    version_entries,
)

if TYPE_CHECKING:
    from indexer.engine import QueryEngine

log = logging.getLogger(__name__)

EngineOpener = Callable[[Path, str, "QueryEngine | None"], "QueryEngine"]
"""Opens and verifies version `version` of ROOT: (root, version, served engine); the served
engine's model may be reused."""


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
    """`last_error`: why the wanted version is not served ('' while it is).
    `pending_version`: the version being loaded now ('' if none)."""

    last_error: str = ""
    pending_version: str = ""


@dataclass(frozen=True)
class ReloadPolicy:
    """Which version to serve and how often to look. Times in seconds.

    A refused version is retried at once when its files change, otherwise after a backoff
    that starts at `poll_seconds` and doubles per failure up to `max_retry_seconds`.
    `pin_version` serves exactly that version, never another (nor ROOT/PINNED or CURRENT's).
    """

    poll_seconds: float = field(
        default=5.0,
        metadata={"help": "how often to check CURRENT for a new version (SIGHUP checks at once)"},
    )
    max_retry_seconds: float = 300.0
    pin_version: str | None = field(
        default=None,
        metadata={
            "help": "serve exactly this version, whatever CURRENT or ROOT/PINNED say",
            "metavar": "VERSION",
        },
    )


@dataclass(frozen=True)
class _Refusal:
    reason: str
    failures: int
    retry_at: float  # time.monotonic() seconds
    fingerprint: tuple[object, ...]


class Reloader:
    """Serves ROOT's wanted version (--pin-version, else ROOT/PINNED, else CURRENT) from an
    EngineHolder: loads it now and whenever it changes, retries it after a refusal, and while
    nothing (or a deleted version) is served falls back to the newest valid version."""

    def __init__(
        self,
        root: Path,
        holder: EngineHolder,
        opener: EngineOpener,
        policy: ReloadPolicy,
        *,
        on_swap: Callable[[str, float], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        pointers: Pointers | None = None,
    ) -> None:
        """`on_swap(version, load_seconds)` follows each swap; `on_failure()` each failure.
        `pointers`: where CURRENT and PINNED are read (default: ROOT's files; Milvus aliases)."""
        self._root = root
        self._pointers = pointers
        self._holder = holder
        self._opener = opener
        self._policy = policy
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._status = ReloadStatus()
        self._status_lock = threading.Lock()
        self._refused: dict[str, _Refusal] = {}
        self._logged_error = ""
        self._refused_now = False  # a refusal was logged during this check
        self._forced = False
        self._stopping = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-reloader", daemon=True)

    def start(self) -> None:
        """Load the wanted version in the background, then keep watching."""
        self._thread.start()

    def request_reload(self) -> None:
        """Check now, retrying refused versions at once. Safe in a signal handler."""
        self._forced = True
        self._wake.set()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop watching; waits for a load in progress (seconds; 0: only ask it to stop).
        A load that ends after this is closed, never served."""
        with self._status_lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def status(self) -> ReloadStatus:
        with self._status_lock:
            return self._status

    def served(self) -> tuple[QueryEngine | None, ReloadStatus]:
        """The served engine and the status that goes with it, read together: a swap and its
        status change at once, so a reader never sees a new version with the old status."""
        with self._status_lock:
            return self._holder.current, self._status

    def check_once(self) -> None:
        """Serve the wanted version if it is new and loadable; otherwise say why, and fall
        back when nothing on disk is served."""
        forced, self._forced = self._forced, False
        self._refused_now = False
        try:
            self._check(forced)
        except OSError as exc:
            self._count_failure()
            self._report(f"cannot read index root {self._root}: {exc.strerror or exc}")
        except UnavailableError as exc:
            self._count_failure()
            self._report(str(exc))

    def _check(self, forced: bool) -> None:
        wanted, source = self._wanted()
        served = self._holder.current
        if served is not None and served.version == wanted:
            if self._on_disk(served):
                self._report("")
                return
            problem = f"version {wanted} ({source}) was deleted from disk"
        else:
            problem = self._try(wanted, source, served, forced, error_when_served="")
            if problem is None:
                self._report("")
                return
        served = self._holder.current
        if source != CURRENT or (served is not None and self._on_disk(served)):
            still = served.version if served is not None else "nothing"
            self._report(f"{problem}; serving {still}")
            return
        fallback_status = self._fall_back(wanted, forced, problem)
        if fallback_status is not None:
            self._report(fallback_status)
        elif served is not None:
            self._report(
                f"{problem}; no valid version to fall back to: still serving {served.version}, "
                "whose files are gone from disk"
            )
        else:
            self._report(f"{problem}; no valid version to fall back to")

    def _on_disk(self, engine: QueryEngine) -> bool:
        return (self._root / VERSIONS / engine.version).is_dir()

    def _wanted(self) -> tuple[str | None, str]:
        """The version to serve and what names it: --pin-version, PINNED or CURRENT."""
        if self._policy.pin_version is not None:
            return self._policy.pin_version, "--pin-version"
        pinned = read_pinned(self._root, self._pointers)
        if pinned is not None:
            return pinned, PINNED
        return read_current(self._root, self._pointers), CURRENT

    def _try(
        self,
        version: str | None,
        source: str,
        served: QueryEngine | None,
        forced: bool,
        *,
        error_when_served: str,
    ) -> str | None:
        """Load `version` unless it was refused and nothing changed since; None once it is
        served (with `error_when_served` as the status), else why not."""
        if version is None:
            return f"nothing published yet: {self._root}/{CURRENT} is missing"
        fingerprint = _fingerprint(self._root / VERSIONS / version)
        refusal = self._refused.get(version)
        if refusal is not None and not forced:
            due = time.monotonic() >= refusal.retry_at or fingerprint != refusal.fingerprint
            if not due:
                return refusal.reason
        try:
            self._load(version, served, error_when_served)
        except Exception as exc:
            return self._refuse(version, source, exc, fingerprint)
        return None

    def _fall_back(self, wanted: str | None, forced: bool, problem: str) -> str | None:
        """Serve the newest version (by creation time) that loads; returns the status that
        says so (None when none loads)."""
        for entry in version_entries(self._root):
            if entry.id == wanted or entry.created is None:
                continue
            status = f"{problem}; serving {entry.id}"
            served = self._holder.current
            if self._try(entry.id, "fallback", served, forced, error_when_served=status) is None:
                log.warning("fell back to %s, the newest valid version", entry.id)
                return status
        return None

    def _load(self, version: str, served: QueryEngine | None, error_when_served: str) -> None:
        self._set_status(replace(self.status(), pending_version=version))
        log.info("loading index version %s from %s", version, self._root)
        start = time.monotonic()
        try:
            engine = self._opener(self._root, version, served)
        finally:
            self._set_status(replace(self.status(), pending_version=""))
        seconds = time.monotonic() - start
        self._refused.pop(version, None)
        with self._status_lock:  # `stop` sets `_stopping` under it: no swap after a stop
            if self._stopping:
                # The server stopped while this version loaded: it must not be served after.
                _close(engine)
                return
            self._holder.swap(engine)
            self._status = replace(self._status, last_error=error_when_served)
        log.info("now serving index version %s (loaded in %.2f s)", version, seconds)
        if self._on_swap is not None:
            self._on_swap(version, seconds)

    def _refuse(
        self, version: str, source: str, exc: Exception, fingerprint: tuple[object, ...]
    ) -> str:
        """Record a failed load and schedule its retry; returns the reason."""
        expected = isinstance(exc, InfluenceIndexError | OSError)
        detail = (
            str(exc) if isinstance(exc, InfluenceIndexError) else f"{type(exc).__name__}: {exc}"
        )
        reason = f"version {version} ({source}) refused: {detail}"
        previous = self._refused.get(version)
        failures = previous.failures + 1 if previous is not None else 1
        delay = min(self._policy.poll_seconds * 2 ** (failures - 1), self._policy.max_retry_seconds)
        self._refused[version] = _Refusal(reason, failures, time.monotonic() + delay, fingerprint)
        self._count_failure()
        self._refused_now = True
        # A verification or I/O failure is explained by its message; anything else is a bug.
        log.error(
            "%s (failure %d; retrying in %.3g s or when its files change)",
            reason,
            failures,
            delay,
            exc_info=None if expected else exc,
        )
        return reason

    def _count_failure(self) -> None:
        if self._on_failure is not None:
            self._on_failure()

    def _report(self, error: str) -> None:
        """Publish `error` as the status; logs it when it changes (not at every poll) unless
        this check's refusal said it already."""
        self._set_status(replace(self.status(), last_error=error))
        if error and error != self._logged_error and not self._refused_now:
            log.error("%s", error)
        self._logged_error = error

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
                # A bug in one check must not end the watcher: the next poll retries.
                log.exception("checking %s failed", self._root)
            self._wake.wait(self._policy.poll_seconds)


def _fingerprint(path: Path) -> tuple[object, ...]:
    """Name, inode, size and modification time of each entry of a version directory: when it
    changes (a file restored, replaced or fixed), a refused version is retried at once."""
    try:
        with os.scandir(path) as entries:
            stats = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    except OSError as exc:
        return (type(exc).__name__,)
    return tuple(sorted((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in stats))
