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
two workers run two passes at once, each on half the cores (`--workers`): a pass split over every core waits at
each op for its slowest thread, and on a small machine the event loop's HTTP work takes a core from one of them
part of the time; two passes on a core each lose only that time (docs/serving.md). Forward passes hold no state
between calls (inference mode and autocast are per thread), so workers share the runs' models; tokenizers are
not safe to call from two threads at once (a fast tokenizer's settings change under a Rust borrow), so
tokenising takes a lock.
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
        threads_per_worker: int | None = None,
        on_batch: Callable[[str, int], None] = lambda run, size: None,
        after_forward: Callable[[ServedRun, int], None] = lambda run, texts: None,
    ):
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.threads_per_worker = threads_per_worker  # torch's compute threads in each worker; None: as they are
        self.on_batch = on_batch  # (run name, texts in one forward pass), for the batch-size histogram
        self.after_forward = after_forward  # (run, texts it just classified), for merged copies of busy runs
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # texts waiting, not yet taken by the worker
        self._closing = False
        self._untrimmed, self._trimmed = False, time.monotonic()  # freed heap memory not yet handed back; when it was
        self._cond = threading.Condition()
        self._tokenizing = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"lorafit-batcher-{i}", daemon=True) for i in range(workers)
        ]

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float) -> None:
        """Finish what is queued (within `timeout` seconds), then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    async def logits(self, run: ServedRun, texts: list[str]) -> np.ndarray:
        """The run's logits for prepared texts, in their order, computed in a batch with other requests."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result) -> None:  # on the worker thread
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

    def _take(self) -> list[_Job]:
        """The next jobs: the oldest job's run, with its other queued jobs up to TAKE_BATCHES * max_batch texts (at
        least one job, however many texts it has). Empty once closing and drained."""
        most = TAKE_BATCHES * self.max_batch
        with self._cond:
            while True:
                while not self._jobs and not self._closing:
                    if self._untrimmed:
                        self._cond.wait(IDLE_TRIM_SECONDS)
                        if not self._jobs and not self._closing:
                            self._trim()
                        continue
                    self._cond.wait()
                if not self._jobs:
                    return []
                first = self._jobs[0]
                deadline = first.arrived + self.max_wait
                while not self._closing and self._jobs and self._jobs[0] is first:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._queued_for(first.run) >= most:
                        break
                    self._cond.wait(left)
                if self._jobs and self._jobs[0] is first:
                    break  # else another worker took it meanwhile: start again from the oldest job left
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
            if kept:
                self._cond.notify()  # another run's requests wait: an idle worker takes them
            return taken

    def _queued_for(self, run: ServedRun) -> int:
        return sum(len(j.texts) for j in self._jobs if j.run is run)

    def _trim(self) -> None:
        release_free_memory()
        self._untrimmed, self._trimmed = False, time.monotonic()

    def _work(self) -> None:
        if self.threads_per_worker:
            torch.set_num_threads(self.threads_per_worker)  # this thread's own setting (OpenMP's is per thread)
        while jobs := self._take():
            served = jobs[0].run
            texts = [t for job in jobs for t in job.texts]
            try:
                logits = self._forward(served, texts)
            except Exception as e:  # a bug, not a bad request: those requests get a 500, the server lives on
                for job in jobs:
                    job.settle(e)
                continue
            start = 0
            for job in jobs:
                job.settle(logits[start : start + len(job.texts)])
                start += len(job.texts)
            self.after_forward(served, len(texts))
            self._untrimmed = True
            if time.monotonic() - self._trimmed > TRIM_SECONDS:
                self._trim()

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
