"""One loaded artifact, eight threads at once: each thread gets exactly what it gets alone
(greedy and seeded sampling), on every target whose runtime is here."""

from __future__ import annotations

import threading

import pytest

import llmc.runtime as rt
from llmc.targets import TARGETS

THREADS = 8
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    [5, 17, 33, 101, 7],
    [{"role": "user", "content": "Tell me a story."}],
    "a b c d e f g h i j k l m n o p",
    "Hello",
    [400, 3, 3, 3],
    "The lighthouse keeper wrote",
]
# two threads sample (a seed of their own), the rest are greedy
OPTIONS = [{"temperature": 0.9, "top_p": 0.95, "seed": i} if i in (2, 5) else {} for i in range(8)]


def tokens(gen, i: int) -> list[int]:
    return [
        e.token for e in gen.events(PROMPTS[i], max_new_tokens=12, ignore_eos=True, **OPTIONS[i])
    ]


@pytest.mark.parametrize("target", ["onnx", "openvino", "tvm"])
def test_eight_threads_on_one_artifact_get_what_each_gets_alone(tiny_artifact, target):
    if TARGETS[target].missing(for_runtime=True):
        pytest.skip(f"{target} is not installed")
    artifact = tiny_artifact("llama", **({"target": target} if target != "onnx" else {}))
    # onnxruntime's and OpenVINO's pools: one thread each (eight spinning pools on two cores
    # take seconds); TVM's thread count is process-wide, left as it is for the other tests
    gen = rt.load(artifact, threads=None if target == "tvm" else 1)
    alone = [tokens(gen, i) for i in range(THREADS)]
    assert len({tuple(t) for t in alone}) > 1  # the prompts lead to different tokens
    for _ in range(2):  # two rounds: the second reuses the pooled sequences
        start = threading.Barrier(THREADS)
        results: list = [None] * THREADS

        def work(i: int, start=start, results=results) -> None:
            start.wait()
            try:
                results[i] = tokens(gen, i)
            except BaseException as exc:  # reported below, not lost in the thread
                results[i] = exc

        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        for i, got in enumerate(results):
            assert got == alone[i], f"thread {i} ({PROMPTS[i]!r}, {OPTIONS[i]}): {got!r}"
