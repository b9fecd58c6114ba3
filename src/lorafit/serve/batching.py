"""Dynamic batching: texts from concurrent requests are collected for a few milliseconds and run together.

Requests wait in one queue. A worker thread takes the run whose request has waited longest, with every other
queued request for that run up to `TAKE_BATCHES` forward passes' worth, once that request has waited `max_wait`
seconds or that much is queued; a busy worker therefore batches whatever arrived meanwhile without waiting again.
The texts are tokenised with the run's own tokenizer and max length, sorted by length, and go through its model (or
its merged copy, where it has one: serve.merging) in passes of at most `max_batch` texts. The encoder itself runs on
the real tokens only (`speed.skip_padding`), so a pass of texts of mixed lengths costs what its tokens cost;
attention, which still pads per text, is what sorting saves on. Runs are batched one at a time (each run's adapter
and head are its own modules, so a forward pass serves one run).

The model runs on the worker threads and never on the event loop, which only parses and answers HTTP. On a CPU
two workers share the cores (`--workers`): a pass that starts while other requests wait runs on its share of them,
and one that starts with nothing else waiting runs on every free core. A pass split over every core waits at each
op for its slowest thread, and on a small machine the event loop's HTTP work takes a core from one of them part of
the time; under load, two passes on a core each lose only that time, while a lone request still gets every core
(docs/serving.md). A pass never runs on more threads than are free, so the cores are never oversubscribed.
Forward passes hold no state between calls (inference mode and autocast are per thread), so workers share the
runs' models; tokenizers are not safe to call from two threads at once (a fast tokenizer's settings change under a
Rust borrow), so tokenising takes a lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..batching import predict_logits
from ..fast.device import release_free_memory
from .registry import ServedRun

TAKE_BATCHES = 4  # forward passes' worth of texts the worker takes at once, to sort by length
# When the worker hands freed heap memory back to the OS: after this long without work, and at least this often
# under load. Passes of ever-changing shapes for many runs leave glibc's heap fragmented, and without a trim the
# resident size grows with the number of runs served; a trim takes milliseconds.
IDLE_TRIM_SECONDS = 0.2
TRIM_SECONDS = 2.0


class QueueFull(Exception):
    """More texts are waiting than the server accepts (`--max-queue`)."""


class ShuttingDown(Exception):
    """The server is draining and takes no new work."""


@dataclass
class _Job:
    run: ServedRun
    texts: list[str]  # already prepared (joined, preprocessed) by the run's Classifier
    settle: Callable[[np.ndarray | BaseException], None]
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        workers: int = 1,
        threads: int | None = None,
        on_batch: Callable[[str, int], None] = lambda run, size: None,
        after_forward: Callable[[ServedRun, int], None] = lambda run, texts: None,
    ):
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        # torch's compute threads the workers share (at least one each); None: one worker, torch's setting as it is
        self._compute_threads = threads
        self._free_threads = None if threads is None else max(threads, workers)
        self._share = None if threads is None else max(1, threads // workers)
        self.on_batch = on_batch  # (run name, texts in one forward pass), for the batch-size histogram
        self.after_forward = after_forward  # (run, texts it just classified), for merged copies of busy runs
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # texts waiting, not yet taken by a worker
        self._closing = False
        self._untrimmed, self._trimmed = False, time.monotonic()  # freed heap memory not yet handed back; when it was
        self._idle: set[int] = set()  # the workers waiting for jobs, by number
        self._in_flight = 0  # passes being computed: an idle worker trims only when none is, since a trim hands back
        # memory that a pass in flight would fault straight back in, and holds the heap's lock while it does
        self._cond = threading.Condition()
        self._tokenizing = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"lorafit-batcher-{i}", daemon=True)
            for i in range(workers)
        ]

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        for thread in self._workers:
            thread.start()

    def close(self, timeout: float) -> None:
        """Finish what is queued (within `timeout` seconds), then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))

    async def logits(self, run: ServedRun, texts: list[str]) -> np.ndarray:
        """The run's logits for prepared texts, in their order, computed in a batch with other requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result) -> None:  # on a worker thread
            loop.call_soon_threadsafe(_set, future, result)

        with self._cond:
            if self._closing:
                raise ShuttingDown()
            if self._queued + len(texts) > self.max_queue:
                raise QueueFull()
            self._jobs.append(_Job(run, texts, settle))
            self._queued += len(texts)
            # every worker: one that waits for a batch to fill counts this job, an idle one may take another run's
            self._cond.notify_all()
        return await future

    def _take(self, worker: int) -> list[_Job]:
        """The next jobs: the oldest job's run, with its other queued jobs up to TAKE_BATCHES * max_batch texts (at
        least one job, however many texts it has). Empty once closing and drained.

        The lowest-numbered free worker takes them: requests that come one at a time all go to one worker, as they
        would with one. With the workers taking turns, lone requests ran slower than with one worker (measured in
        docs/serving.md; likely each pass starting beside the other worker's still-spinning OpenMP threads)."""
        most = TAKE_BATCHES * self.max_batch
        with self._cond:
            self._idle.add(worker)
            if len(self._workers) > 1:
                self._cond.notify_all()  # a higher-numbered worker about to take a job leaves it to this one
            try:
                first = self._wait_for_jobs(worker, most)
            finally:
                self._idle.discard(worker)
            if first is None:
                return []
            run = first.run
            taken, size, kept = [], 0, deque()
            for job in self._jobs:
                if job.run is run and (not taken or size + len(job.texts) <= most):
                    taken.append(job)
                    size += len(job.texts)
                else:
                    kept.append(job)
            self._jobs = kept
            self._queued -= size
            self._in_flight += 1
            if kept:
                self._cond.notify()  # another run's requests wait: an idle worker takes them
            return taken

    def _wait_for_jobs(self, worker: int, most: int) -> _Job | None:
        """(Holding the lock) the oldest job, once this worker is the lowest-numbered free one and the job has waited
        `max_wait` or `most` texts of its run are queued; None once closing and drained."""
        while True:
            while not self._jobs and not self._closing:
                if self._untrimmed and not self._in_flight:
                    self._cond.wait(IDLE_TRIM_SECONDS)
                    if not self._jobs and not self._closing and not self._in_flight:
                        self._trim()
                    continue
                self._cond.wait()
            if not self._jobs:
                return None
            if self._lower_free(worker):
                self._cond.wait()  # it takes the job
                continue
            first = self._jobs[0]
            deadline = first.arrived + self.max_wait
            while not self._closing and self._jobs and self._jobs[0] is first and not self._lower_free(worker):
                left = deadline - time.monotonic()
                if left <= 0 or self._queued_for(first.run) >= most:
                    break
                self._cond.wait(left)
            if self._jobs and self._jobs[0] is first and not self._lower_free(worker):
                return first
            # else another worker took it meanwhile: start again from the oldest job left

    def _lower_free(self, worker: int) -> bool:
        return any(other < worker for other in self._idle)

    def _queued_for(self, run: ServedRun) -> int:
        return sum(len(j.texts) for j in self._jobs if j.run is run)

    def _trim(self) -> None:
        release_free_memory()
        self._untrimmed, self._trimmed = False, time.monotonic()

    def _work(self, worker: int) -> None:
        threads_set = None  # torch's thread count as this worker last set it
        while jobs := self._take(worker):
            served = jobs[0].run
            texts = [t for job in jobs for t in job.texts]
            threads = self._reserve_threads()
            # only on a change: besides the thread count, torch.set_num_threads empties oneDNN's cache of primitives
            if threads and threads != threads_set:
                torch.set_num_threads(threads)  # this thread's own setting: OpenMP's is per thread
                threads_set = threads
            try:
                logits = self._forward(served, texts)
            except Exception as e:  # a bug, not a bad request: those requests get a 500, the server lives on
                logits = e
            finally:
                self._release_threads(threads)
            if isinstance(logits, Exception):
                for job in jobs:
                    job.settle(logits)
            else:
                start = 0
                for job in jobs:
                    job.settle(logits[start : start + len(job.texts)])
                    start += len(job.texts)
                self.after_forward(served, len(texts))
            with self._cond:
                self._in_flight -= 1
                self._untrimmed = True
                self._cond.notify_all()  # an idle worker may trim now
            if time.monotonic() - self._trimmed > TRIM_SECONDS:
                self._trim()

    def _reserve_threads(self) -> int:
        """Compute threads for this worker's next pass: its share while other requests wait, every free thread when
        none does; waits while fewer than its share are free. 0 where the workers leave torch's setting alone."""
        if self._free_threads is None:
            return 0
        with self._cond:
            while self._free_threads < self._share:
                self._cond.wait()
            threads = self._share if self._jobs else min(self._free_threads, self._compute_threads)
            self._free_threads -= threads
        return threads

    def _release_threads(self, threads: int) -> None:
        if threads:
            with self._cond:
                self._free_threads += threads
                self._cond.notify_all()

    def _forward(self, served: ServedRun, texts: list[str]) -> np.ndarray:
        run = served.run  # read once: a merged copy may take over between passes
        for start in range(0, len(texts), self.max_batch):
            self.on_batch(served.name, min(self.max_batch, len(texts) - start))
        with self._tokenizing:
            enc = run.encode(texts)
        logits = predict_logits(run.model, enc, self.max_batch, run.tokenizer.pad_token_id, run.device, run.dtype)
        return run.blended(texts, logits)


def _set(future: asyncio.Future, result) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
