"""A kernel variant is trusted on a GPU only after it ran once there and matched the reference.

The original MARLIN's default tile faults with "illegal instruction" on an H100 it was never
run on; the next chip will bring the same class of failure here. So the first time a
compiled variant (a rung's kernel with one set of defines) is about to run on a kind of GPU,
it first runs on a small random problem and is compared with the reference. The verdict is
kept in this process (a dict lookup on later launches) and on disk beside CuPy's kernel
cache, keyed like the module (rung, variant, sources hash, GPU name and compute
capability, CuPy version), so later processes pay nothing either.

A mismatch refuses the variant with `VariantRefused`, and so does an exception during the
check, attributed to it. A hard fault (illegal instruction, illegal address) also poisons
the CUDA context: the error is raised as a VariantRefused naming the variant, and the
process cannot launch anything else on that GPU; nothing tries to recover it. Before the
check runs, a "pending" verdict is written; a later process that finds one left by a
process that is gone knows the check never finished (a crash) and refuses the variant
without running it again. Delete the verdict file named in the error to retry.

Under CUDA-graph capture nothing can be synchronised or copied back, so a variant first met
during capture is launched unchecked and checked at its first eager launch (warm up before
capturing, as torch's CUDA-graph documentation asks anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

OK, PENDING, REFUSED = "ok", "pending", "refused"


class VariantRefused(RuntimeError):
    """A compiled kernel variant failed its first-run check on this GPU (or never finished it)."""


def cache_dir() -> Path:
    """Where verdicts are kept: a folder in CuPy's kernel cache (CUPY_CACHE_DIR)."""
    root = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache")).expanduser()
    return root / "marlin_ladder_first_run"


def verdict_key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell: assume the other check is still running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Verdicts:
    """First-run verdicts, in memory (keyed by any hashable) and, when `directory` is given,
    on disk (keyed by a digest computed only when memory has no verdict)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[Hashable, tuple[str, str]] = {}  # key -> (verdict, reason)
        self._running: set[Hashable] = set()
        self._lock = threading.RLock()

    def _path(self, digest: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{digest}.json"

    def _read(self, digest: str) -> dict | None:
        path = self._path(digest)
        try:
            return json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None

    def _write(self, digest: str, record: dict) -> None:
        path = self._path(digest)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(record))
            scratch.replace(path)
        except OSError:
            pass  # a read-only cache only costs a re-check in the next process

    def check(self, key: Hashable, variant: str, probe: Callable[[], str], digest: Callable[[], str]) -> None:
        """Return when `variant` has passed; otherwise run `probe` once (it returns "" on a
        match or says what went wrong) and raise VariantRefused if it did not pass.
        `digest()` names the verdict on disk (see verdict_key)."""
        known = self._memory.get(key)
        if known is not None and known[0] == OK:
            return  # the steady state: one dict lookup
        with self._lock:
            known = self._memory.get(key)
            if key in self._running:  # the probe itself launches the variant
                return
            if known is None:
                name = digest()
                known = self._from_disk(name, variant)
                if known[0] is None:
                    self._running.add(key)
                    try:
                        known = self._run(name, variant, probe)
                    finally:
                        self._running.discard(key)
                self._memory[key] = known
        if known[0] != OK:
            raise VariantRefused(known[1])

    def passed(self, key: Hashable) -> bool:
        """Whether `key` has passed in this process (one dict lookup)."""
        known = self._memory.get(key)
        return known is not None and known[0] == OK

    def forget(self) -> None:
        """Drop the in-memory verdicts (tests)."""
        self._memory.clear()

    def _from_disk(self, digest: str, variant: str) -> tuple[str | None, str]:
        record = self._read(digest)
        if record is None:
            return None, ""
        if record["verdict"] == PENDING:
            if _alive(record["pid"], record["host"]):
                return None, ""  # another process is checking it right now: check it here too
            return REFUSED, (
                f"kernel variant {variant} was refused: its first-run check in an earlier process (pid "
                f"{record['pid']}) never finished, which means it crashed (a GPU fault, most likely); delete "
                f"{self._path(digest)} to check it again"
            )
        return record["verdict"], record.get("reason", "")

    def _run(self, digest: str, variant: str, probe: Callable[[], str]) -> tuple[str, str]:
        self._write(digest, {"verdict": PENDING, "variant": variant, "pid": os.getpid(), "host": socket.gethostname()})
        try:
            problem = probe()
        except Exception as e:  # a fault, a launch or compile failure: all are this variant's
            problem = f"it raised {type(e).__name__}: {e} (after a GPU fault the CUDA context is unusable; restart the process)"
        if not problem:
            self._write(digest, {"verdict": OK, "variant": variant})
            return OK, ""
        where = f"; delete {self._path(digest)} to check it again" if self.directory is not None else ""
        reason = f"kernel variant {variant} failed its first-run check on this GPU: {problem}{where}"
        self._write(digest, {"verdict": REFUSED, "variant": variant, "reason": reason})
        return REFUSED, reason


VERDICTS = Verdicts(cache_dir())
