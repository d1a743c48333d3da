"""Continuous batching: requests share one sequence of the model, joining it between steps and
leaving it when they finish, so a step decodes every running request at once and nothing waits
for the slowest one. One thread runs the steps; callers submit requests from any thread and get
each request's step events through a callback (the server turns them into HTTP chunks).

With a drafter ("prompt-lookup"), a step drafts for the rows whose policy asks for tokens and
verifies all rows in one multi-token step, as `Generator.token_steps` does for a fixed batch."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.drafters import PromptLookup
from llmc.runtime.generator import GenerationConfig, Generator, StepEvent, TextStream
from llmc.runtime.sampling import Sampler
from llmc.runtime.speculative import MAX_DRAFT, VERIFY_COST, DraftPolicy, StepClock, verify_row

# An idle batcher lets a burst of requests gather before its first prefill, so that the burst
# is prefilled in one step rather than its first arrival alone and the rest one step later: it
# waits while requests keep arriving within GATHER_S of each other, GATHER_MAX_S in all. A lone
# request on an idle server waits GATHER_S.
GATHER_S = 0.004
GATHER_MAX_S = 0.05


class QueueFull(LlmcError):
    """More requests wait than the batcher's queue holds: try again later."""


class Closed(LlmcError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class Request:
    """One generation: its prompt, options and where its events go. `emit` is called from the
    batcher's thread with each StepEvent, or once with an exception if the request failed."""

    ids: list[int]
    config: GenerationConfig
    emit: Callable[[StepEvent | BaseException], None]
    id: int = 0
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class _Row:
    """A running request: its sampler, tokens so far, text stream and draft policy."""

    def __init__(self, request: Request, gen: Generator, clock, num_draft: int, drafter):
        self.request = request
        budget = min(request.config.max_new_tokens, gen.model.max_context - len(request.ids))
        self.stream = TextStream(gen.tokenizer, request.config, len(request.ids), budget)
        self.sampler = Sampler(request.config.sampling)
        self.history = np.asarray(request.ids, np.int64)
        self.policy = DraftPolicy(num_draft, clock) if clock else None
        self.lookup = drafter() if clock else None
        if self.lookup:
            self.lookup.start([request.ids])

    @property
    def done(self) -> bool:
        return self.stream.finished or self.request.cancelled

    def take(self, tokens: list[int]) -> None:
        """Emit the events of the new tokens, up to the one that finishes the request."""
        for token in tokens:
            if self.done:
                return
            self.history = np.append(self.history, token)
            event = self.stream.push(token)
            try:
                self.request.emit(event)
            except Exception:  # the receiver is gone: nobody is left to stream to
                self.request.cancelled = True


class Batcher:
    """Schedules requests on one sequence of `generator`'s model: at most `max_batch` run at
    once and `max_queue` wait beyond the places free in the batch; `draft="prompt-lookup"`
    drafts up to `num_draft` tokens a step (each request with a `drafter()` of its own)."""

    drafter = PromptLookup

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 16,
        max_queue: int = 64,
        draft: str | None = None,
        num_draft: int = 8,
    ):
        if draft not in (None, "prompt-lookup"):
            raise LlmcError(f"the server drafts with 'prompt-lookup' only, not {draft!r}.")
        if not 1 <= num_draft <= MAX_DRAFT:
            raise LlmcError(f"num_draft must be from 1 to {MAX_DRAFT}; got {num_draft}.")
        self.gen = generator
        self.max_batch, self.max_queue = max_batch, max_queue
        self.num_draft = num_draft
        self._clock = StepClock(VERIFY_COST) if draft else None
        self._pending: deque[Request] = deque()
        self._rows: list[_Row] = []
        generator.model.prepare_batching()
        self._seq = generator.model.sequence()
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._ids = itertools.count(1)
        self.kv_bytes = 0  # KV cache the running requests hold (read by the server's metrics)
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="llmc-batcher", daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, ids: list[int], config: GenerationConfig, emit) -> Request:
        """Queue a request; QueueFull past `max_queue` waiting, Closed while shutting down."""
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down; send the request elsewhere.")
            free = max(0, self.max_batch - len(self._rows))  # places the next step fills
            if len(self._pending) >= self.max_queue + free:
                raise QueueFull(f"{len(self._pending)} requests are waiting; retry shortly.")
            request = Request(list(ids), config, emit, next(self._ids))
            self._pending.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client left): it emits nothing more and its cache is freed."""
        with self._cond:
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the queued and running ones finish for up to `timeout`
        seconds, cancel what is left, and stop the thread."""
        with self._cond:
            self._closing = True
            self._deadline = time.perf_counter() + timeout
            self._cond.notify()
        self._thread.join(timeout + 5.0)

    # -- the step loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._rows or self._closing):
                    self._cond.wait()
                if not self._rows:
                    self._gather()
                if self._closing and (
                    time.perf_counter() > self._deadline or not (self._pending or self._rows)
                ):
                    self._stop()
                    return
                joining = []
                while self._pending and len(self._rows) + len(joining) < self.max_batch:
                    joining.append(self._pending.popleft())
            try:
                if joining:
                    self._join(joining)
                self._leave()
                if self._rows:
                    self._step()
                self._leave()
            except Exception as exc:  # a failed step fails its requests, never the server
                self._fail(exc, joining)
            self.kv_bytes = self._seq.kv_bytes

    def _gather(self) -> None:
        """On an idle batcher, wait while a burst of requests is still arriving (see GATHER_S)."""
        first = self._pending[0].submitted if self._pending else 0.0  # the cap holds on cancels
        while self._pending and len(self._pending) < self.max_batch and not self._closing:
            last = self._pending[-1].submitted
            wait = min(last + GATHER_S, first + GATHER_MAX_S) - time.perf_counter()
            if wait <= 0:
                return
            self._cond.wait(wait)

    def _join(self, requests: list[Request]) -> None:
        rows = [_Row(r, self.gen, self._clock, self.num_draft, self.drafter) for r in requests]
        logits = self._seq.add([r.ids for r in requests])
        self._rows += rows
        for row, token in zip(rows, _picks(rows, logits), strict=True):
            row.take([token])

    def _leave(self) -> None:
        gone = [b for b, row in enumerate(self._rows) if row.done]
        if gone:
            self._seq.remove(gone)
            self._rows = [row for row in self._rows if not row.done]

    def _step(self) -> None:
        rows, started = self._rows, time.perf_counter()
        last = np.array([[row.history[-1]] for row in rows])
        drafts = self._drafts() if self._clock and not self._clock.uncalibrated() else None
        if not drafts:
            # decode(), not step(): on OpenVINO the server's 8-client throughput was 4-7% lower
            # with the step's view of the request's output (6 alternating runs); not understood
            logits = self._seq.decode(last)
            if self._clock:
                self._clock.plain(time.perf_counter() - started)
            for row, token in zip(rows, _picks(rows, logits), strict=True):
                row.stream.stats.steps += 1
                row.take([token])
            self.steps += 1
            return
        k = max(len(d.tokens) for d in drafts)
        block = np.repeat(last, 1 + k, axis=1)
        for b, d in enumerate(drafts):
            block[b, 1 : 1 + len(d.tokens)] = d.tokens
        held = self._seq.lengths
        logits = self._seq.extend(block)
        kept = []
        for b, (row, d) in enumerate(zip(rows, drafts, strict=True)):
            n = len(d.tokens)
            tokens = verify_row(logits[b, : n + 1], d, row.history, row.sampler)
            stats = row.stream.stats
            stats.steps, stats.drafted = stats.steps + 1, stats.drafted + n
            stats.accepted += len(tokens) - 1
            row.policy.update(n, len(tokens) - 1)
            kept.append(len(tokens))
            row.take(tokens)
            row.lookup.commit([len(tokens) - 1])
        self._seq.truncate(held + np.array(kept))
        self._clock.speculative(time.perf_counter() - started, k)
        self.steps += 1

    def _drafts(self) -> list | None:
        """Each row's draft (possibly empty) for this step, or None if no row drafts."""
        room = self.gen.model.max_context - int(self._seq.lengths.max()) - 1
        drafts = []
        for row in self._rows:
            k = min(row.policy.choose(), row.stream.budget - row.stream.produced - 1, room)
            drafts.append(row.lookup.propose([row.history], [max(k, 0)], row.sampler)[0])
        return drafts if any(len(d.tokens) for d in drafts) else None

    def _fail(self, exc: Exception, joining: list[Request]) -> None:
        """Fail every running (and joining) request with `exc`; start on a fresh sequence."""
        requests = {id(r): r for r in [*joining, *(row.request for row in self._rows)]}
        for request in requests.values():
            if not request.cancelled:
                with contextlib.suppress(Exception):
                    request.emit(exc)
        self._rows = []
        self._seq = self.gen.model.sequence()

    def _stop(self) -> None:
        """Cancel what is left (the shutdown deadline passed)."""
        closed = Closed("the server shut down before this request finished.")
        for request in [*self._pending, *(row.request for row in self._rows)]:
            if not request.cancelled:
                with contextlib.suppress(Exception):
                    request.emit(closed)
        self._pending.clear()
        self._rows = []
        self._seq.reset()
        self.kv_bytes = 0


def _picks(rows: list[_Row], logits: np.ndarray) -> list[int]:
    """Each row's next token from its logits [rows, V]: the greedy rows without a repetition
    penalty by one argmax over all of them (row by row, each argmax is a first numpy call on
    caches the step just swept, and the server's 8-client step spent 5% of its time there),
    the others by their own samplers."""
    plain = [b for b, row in enumerate(rows) if row.sampler.greedy_plain]
    picks = [0] * len(rows)
    if plain:
        best = np.argmax(logits if len(plain) == len(rows) else logits[plain], axis=-1).tolist()
        for b, token in zip(plain, best, strict=True):
            picks[b] = token
    if len(plain) < len(rows):
        for b, row in enumerate(rows):
            if not row.sampler.greedy_plain:
                picks[b] = row.sampler.pick(logits[b], row.history)
    return picks
