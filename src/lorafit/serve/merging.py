"""Merged copies for the busiest runs, within a memory budget.

An unmerged run on a shared base costs a few MB, but each forward pass also computes its adapter's update; a merged
run answers at the merged model's speed (and with predict's exact logits) for a copy of the layers its adapter
changes. A server of many runs is usually busy with a few of them, so it serves every run unmerged on the shared
base and gives a merged copy to a run once it is busy, while the copies fit in `--merge-budget-mb`.

A run is busy once it has had `HOT_TEXTS` texts within the last `HOT_WINDOW` seconds. Busy runs get their copies in
the order they got busy, one at a time, on a thread of their own, each built exactly as `lorafit predict` merges
(from the run folder, in fp32) while the run goes on being served unmerged; the finished copy takes over from the
next forward pass. A copy unused for `idle_seconds` is dropped, which makes room for another. A busy run never loses
its copy to another busy run: with more busy runs than the budget holds, the first to get busy keep theirs, and
copies do not churn.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque

from ..fast.device import release_free_memory
from ..inference.loaded import SharedBases, merged_copy_bytes
from .registry import ServedRun

HOT_TEXTS = 64  # texts within HOT_WINDOW seconds that make a run busy enough for a merged copy
HOT_WINDOW = 10.0
IDLE_SECONDS = 60.0  # a merged copy unused this long is dropped


class MergedCopies:
    def __init__(
        self,
        loader: SharedBases,
        budget_bytes: int,
        idle_seconds: float = IDLE_SECONDS,
        hot_texts: int = HOT_TEXTS,
        window: float = HOT_WINDOW,
    ):
        self.loader, self.budget, self.idle_seconds = loader, budget_bytes, idle_seconds
        self.hot_texts, self.window = hot_texts, window
        self._recent: dict[str, deque[tuple[float, int]]] = {}  # run name -> (when, texts) of its recent passes
        self._last_used: dict[str, float] = {}
        self._copies: dict[str, ServedRun] = {}  # runs holding a merged copy, or having one built
        self._sizes: dict[str, int] = {}  # bytes each run's merged copy holds (or would hold)
        self._waiting: dict[str, ServedRun] = {}  # busy runs waiting for the builder, in the order they got busy
        self._builder: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes[name] for name in self._copies)

    def note(self, served: ServedRun, texts: int) -> None:
        """After each forward pass (on a batcher's worker thread): count the run's traffic, drop copies that
        have idled, and queue the run for a copy once it is busy."""
        now = time.monotonic()
        self._last_used[served.name] = now
        self._drop_idle(now)
        # only a run served unmerged on a base it shares gains from a copy
        if not served.loaded.shares_base or served.loaded.merged or served.merged_copy is not None:
            return
        with self._lock:  # two workers may note passes of one run at once
            recent = self._recent.setdefault(served.name, deque())
            recent.append((now, texts))
            while recent and recent[0][0] < now - self.window:
                recent.popleft()
            if sum(n for _, n in recent) < self.hot_texts:
                return
            if served.name in self._copies or served.name in self._waiting:
                return
            self._waiting[served.name] = served
            if self._builder is None or not self._builder.is_alive():
                # one copy at a time: building one takes the cores' time from serving
                self._builder = threading.Thread(target=self._build_waiting, name="lorafit-merge", daemon=True)
                self._builder.start()

    def wait(self, timeout: float) -> None:
        """Wait until the copies asked for are built (for tests, and the benchmark)."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)

    def _build_waiting(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                name = next(iter(self._waiting))
                served = self._waiting.pop(name)
                if name not in self._sizes:
                    self._sizes[name] = merged_copy_bytes(served.loaded)
                if sum(self._sizes[n] for n in self._copies) + self._sizes[name] > self.budget:
                    continue  # no room: a busy run keeps its copy (it is tried again when it is busy later)
                self._copies[name] = served  # its room is taken while the copy is built
            self._build(served)

    def _build(self, served: ServedRun) -> None:
        run = served.loaded
        try:
            copy = self.loader.load(run.folder, run.cfg, merged=True)
        except Exception as e:  # a bug, not a request's fault: the run goes on unmerged
            print(f"lorafit serve: could not merge {served.name} ({e}); it stays unmerged", file=sys.stderr)
            with self._lock:
                self._copies.pop(served.name, None)
                self._sizes[served.name] = self.budget + 1  # never tried again
            return
        served.merged_copy = copy  # the worker reads it at the start of its next pass
        release_free_memory()  # the fp32 model the copy was merged in

    def _drop_idle(self, now: float) -> None:
        with self._lock:
            idle = [
                name
                for name, served in self._copies.items()
                if served.merged_copy is not None and now - self._last_used.get(name, now) > self.idle_seconds
            ]
            for name in idle:
                self._copies.pop(name).merged_copy = None
                self._recent.pop(name, None)
        if idle:
            release_free_memory()
