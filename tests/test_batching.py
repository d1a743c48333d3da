"""Continuous batching: rows that join a running batch and leave it get the logits they get
alone (Sequence.add / remove on every target's KV variant), and the batcher that schedules
requests on one sequence gives each the text it gets alone."""

from __future__ import annotations

import time

import numpy as np
import pytest

import llmc.runtime as rt
from llmc.errors import SessionError
from llmc.targets.onnx import session as onnx_session

VARIANTS = [("onnx", None), ("onnx", "-rewire_kv_cache"), ("openvino", None)]
PROMPTS = [[1, 5, 9, 23, 5, 9], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [4, 8, 15]]


def _alone(gen, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of one prompt decoded alone, and the logits of each step [steps, V]."""
    seq = gen.model.sequence()
    logits = [seq.prefill(np.array([prompt]))[0]]
    tokens = [int(logits[0].argmax())]
    for _ in range(steps - 1):
        logits.append(seq.decode(np.array([[tokens[-1]]]))[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, np.stack(logits)


def check_join_and_leave(gen, tolerance: float = 1e-4, steps: int = 6) -> None:
    """Rows join a running batch at different steps and leave it at others; every row's logits
    at every step are those it gets alone."""
    alone = [_alone(gen, p, steps) for p in PROMPTS]
    seq = gen.model.sequence()
    live: list[int] = []  # prompt index of each row
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(len(PROMPTS))}
    joins = {0: [0], 2: [1, 2], 4: [3]}  # step -> prompts that join before it
    for step in range(2 * steps):
        if step in joins:
            joined = seq.add([PROMPTS[i] for i in joins[step]])
            for i, row_logits in zip(joins[step], joined, strict=True):
                got[i].append(row_logits)
            live += joins[step]
        done = [r for r, i in enumerate(live) if len(got[i]) == steps]
        seq.remove(done)
        live = [i for r, i in enumerate(live) if r not in done]
        if not live:
            break
        last = np.array([[alone[i][0][len(got[i]) - 1]] for i in live])
        for i, row_logits in zip(live, seq.decode(last), strict=True):
            got[i].append(row_logits)
        assert seq.lengths.tolist() == [len(PROMPTS[i]) + len(got[i]) - 1 for i in live]
    assert seq.lengths.size == 0 and seq.kv_bytes == 0
    for i, (_, want) in enumerate(alone):
        assert np.abs(np.stack(got[i]) - want).max() <= tolerance, f"prompt {i}"


@pytest.mark.parametrize("target, passes", VARIANTS, ids=["onnx", "onnx-concat", "openvino"])
def test_rows_join_and_leave_a_running_batch(target, passes, tiny_artifact):
    extra = {"passes": passes} if passes else {}
    gen = rt.load(tiny_artifact("llama", target=target, **extra))
    check_join_and_leave(gen)
    seq = gen.model.sequence()
    with pytest.raises(SessionError, match="needs live rows"):
        seq.remove([0])
    seq.add([PROMPTS[0]])
    with pytest.raises(SessionError, match="rows 0 to 0"):
        seq.remove([1])
    assert seq.kv_bytes > 0


def run_batcher(batcher, prompts, configs) -> list[list]:
    """Submit every prompt at once; wait for each request's events."""
    import threading

    events: list[list] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            events[i].append(event)
            if isinstance(event, BaseException) or event.finish_reason:
                finished.release()

        return emit

    for i, (ids, config) in enumerate(zip(prompts, configs, strict=True)):
        batcher.submit(ids, config, emitter(i))
    for _ in prompts:
        assert finished.acquire(timeout=120)
    return events


class _Oracle:
    """Drafts each request's plain greedy continuation (`continuations`, by prompt), at least 3
    tokens a step whatever the policy asks (which, on tiny models, is rarely worth it) and every
    third one wrong: verification and rollback run at every offset of every row."""

    continuations: dict[tuple, list[int]] = {}

    def __init__(self):
        self.count = 0

    def start(self, prompts):
        self.text = list(prompts[0]) + self.continuations[tuple(prompts[0])]

    def propose(self, histories, ks, sampler):
        from llmc.runtime.speculative import Draft

        history, k = histories[0], max(ks[0], 3)
        tokens = np.array(self.text[len(history) : len(history) + k], np.int64)
        for i in range(len(tokens)):
            self.count += 1
            tokens[i] = tokens[i] + 1 if self.count % 3 == 0 else tokens[i]
        return [Draft(tokens)]

    def commit(self, accepted):
        pass


@pytest.mark.parametrize("target, passes", VARIANTS, ids=["onnx", "onnx-concat", "openvino"])
@pytest.mark.parametrize("draft", [None, "oracle"])
def test_batcher_gives_each_request_its_text_alone(target, passes, draft, tiny_artifact):
    from llmc.runtime.batcher import Batcher
    from llmc.runtime.generator import _config

    class OracleBatcher(Batcher):
        drafter = _Oracle

    extra = {"passes": passes} if passes else {}
    gen = rt.load(tiny_artifact("llama", target=target, **extra))
    prompts = [gen.encode(f"{i} little {'pigs ' * i}went to market") for i in range(8)]
    lengths = [5, 30, 12, 40, 3, 25, 18, 33]
    configs = [_config(max_new_tokens=n, ignore_eos=True) for n in lengths]
    sampled = {"temperature": 0.8, "seed": 3}
    configs[5] = _config(max_new_tokens=25, ignore_eos=True, **sampled)
    alone = [
        list(gen.events(ids, max_new_tokens=n, ignore_eos=True, **(sampled if i == 5 else {})))
        for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    _Oracle.continuations = {
        tuple(p): [e.token for e in a] for p, a in zip(prompts, alone, strict=True)
    }
    kind = OracleBatcher if draft else Batcher
    batcher = kind(gen, max_batch=5, draft=draft and "prompt-lookup", num_draft=4)
    try:
        events = run_batcher(batcher, prompts, configs)
    finally:
        batcher.close(timeout=5)
    for i, n in enumerate(lengths):
        usage = events[i][-1].usage
        assert events[i][-1].finish_reason == "length" and usage.completion_tokens == n
        if draft and i == 5:  # sampled with drafts: the same distribution, other draws
            assert usage.drafted > 0
            continue
        assert [e.token for e in events[i]] == [e.token for e in alone[i]], f"request {i}"
        assert "".join(e.text for e in events[i]) == "".join(e.text for e in alone[i])
        if draft and n > 5:
            assert 0 < usage.accepted < usage.drafted and usage.steps < n - 1
    assert batcher.running == 0 and batcher.kv_bytes == 0


def test_a_burst_on_an_idle_batcher_is_prefilled_in_one_step(tiny_artifact, monkeypatch):
    """Requests arriving a few milliseconds apart on an idle batcher join in one prefill, not
    the first alone and the rest a step later. A full batch ends the gathering at once, so the
    fifth request joins on its own whatever the machine's scheduling."""
    from llmc.runtime import batcher as batching
    from llmc.runtime.generator import _config

    monkeypatch.setattr(batching, "GATHER_S", 0.5)  # wide: a loaded machine cannot split the
    monkeypatch.setattr(batching, "GATHER_MAX_S", 2.0)  # burst by scheduling the threads late
    joins = []

    class Counting(batching.Batcher):
        def _join(self, requests):
            joins.append(len(requests))
            super()._join(requests)

    gen = rt.load(tiny_artifact("llama"))
    batcher = Counting(gen, max_batch=4)
    events = [[] for _ in range(5)]
    config = _config(max_new_tokens=4, ignore_eos=True)
    try:
        for i in range(5):
            batcher.submit(PROMPTS[i % len(PROMPTS)], config, events[i].append)
            time.sleep(0.005)  # arrivals a few milliseconds apart, as HTTP requests come
        deadline = time.monotonic() + 60
        while not all(e and e[-1].finish_reason for e in events) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        batcher.close(timeout=5)
    assert joins == [4, 1]
    assert all(e[-1].finish_reason == "length" and len(e) == 4 for e in events)


def test_cancelled_request_stops_and_frees_its_rows(tiny_artifact):
    from llmc.runtime.batcher import Batcher
    from llmc.runtime.generator import _config

    gen = rt.load(tiny_artifact("llama"))
    batcher = Batcher(gen, max_batch=2)
    try:
        events = []

        def emit(event):  # runs on the batcher's thread: cancels at the third token
            events.append(event)
            if len(events) == 3:
                batcher.cancel(request)

        request = batcher.submit(gen.encode("pigs"), _config(max_new_tokens=200), emit)
        other = run_batcher(batcher, [gen.encode("little pigs")], [_config(max_new_tokens=20)])
        deadline = time.monotonic() + 30
        while batcher.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(events) == 3 and events[-1].finish_reason is None
        assert other[0][-1].finish_reason in ("length", "eos")
        assert batcher.running == 0 and batcher.kv_bytes == 0 and batcher.queued == 0
    finally:
        batcher.close(timeout=5)


def test_quantized_rows_join_on_the_fast_kernels(tiny_artifact):
    """int8 ONNX: exactly, rows joining and leaving get their logits alone; on the fast kernels
    (a joining prompt prefills on them, not on the exact ones every running row would wait for)
    a row's logits do not depend on which batch it joins, and a short prompt alone gets them too
    (FAST_PROMPT); without int8 dot products, longer prompts run on the exact kernels."""
    path = tiny_artifact("llama", quant="int8")
    check_join_and_leave(rt.load(path, exact=True))
    gen = rt.load(path)
    assert gen.model.fast_kernels
    joined = []
    for others in ([PROMPTS[0]], [PROMPTS[1], PROMPTS[3]]):
        seq = gen.model.sequence()
        seq.add(others)
        joined.append(seq.add([PROMPTS[2]])[0])
        step = seq.decode(np.array([[5]] * (len(others) + 1)))[-1]
        joined.append(step)
    assert np.abs(joined[0] - joined[2]).max() <= 1e-5  # the join
    assert np.abs(joined[1] - joined[3]).max() <= 1e-5  # and the step after it
    alone = gen.model.sequence().prefill(np.array([PROMPTS[2]]))[0]
    assert np.abs(joined[0] - alone).max() <= 1e-5  # a short prompt alone: the same kernels
    if not gen.model.fast_prompts:  # no int8 dot products: longer prompts alone run exactly
        longer = onnx_session.FAST_PROMPT + 1
        assert gen.model.session_for(longer, False)[0] is gen.model.prefill_session
        assert gen.model.session_for(8, False, total=longer)[0] is gen.model.prefill_session
        gen.model.fast_prompt = 0  # as LLMC_EXACT_PROMPTS=1 asks
        exact = gen.model.sequence().prefill(np.array([PROMPTS[2]]))[0]
        assert 0 < np.abs(joined[0] - exact).max() <= 1.0
