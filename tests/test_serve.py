"""`llmc serve` as a real process on 127.0.0.1, driven by the official `openai` client: chat,
completions, streaming, stop strings, usage, errors; eight concurrent streams each equal to the
text it gets alone; more than twenty kinds of bad request, each a 4xx with OpenAI's error
object, the server healthy afterwards; a full queue (429), a client that leaves (cancelled),
and SIGTERM (in-flight requests finish, exit 0)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import llmc.runtime as rt

openai = pytest.importorskip("openai")
NAME = "tiny"
MESSAGES = [{"role": "user", "content": "Tell me about the little pigs."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(artifact: Path, *flags: str, timeout: float = 90):
    """A `llmc serve` process on a free local port -> (base URL, process); stopped at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmc.cli", "serve", str(artifact), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--model-name", NAME, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def running(artifact):
    with server(artifact, "--max-batch", "4") as (url, _):
        yield url


@pytest.fixture(scope="module")
def gen(artifact):
    return rt.load(artifact)


def test_chat_and_completions_with_the_openai_client(running, gen):
    c = client(running)
    assert [m.id for m in c.models.list().data] == [NAME]
    alone = list(gen.events(MESSAGES, max_new_tokens=24))
    text = "".join(e.text for e in alone)
    r = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert (
        r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[alone[-1].finish_reason]
    )
    u = alone[-1].usage
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        u.prompt_tokens,
        u.completion_tokens,
    )
    assert r.usage.total_tokens == u.prompt_tokens + u.completion_tokens

    # streaming: the same text in chunks, a role first, the finish reason, then the usage
    chunks = list(
        c.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    # a stop string from the middle of the text: cut before it, finish "stop"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = c.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    # completions: a raw prompt, and token ids
    prompt = "Once upon a time"
    want = gen.generate(prompt, max_new_tokens=10)
    done = c.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert done.choices[0].text == want and done.object == "text_completion"
    ids = gen.encode(prompt)
    again = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert again.choices[0].text == want and again.usage.prompt_tokens == len(ids)
    default = c.completions.create(model=NAME, prompt=prompt, temperature=0)  # 16, as the API
    assert default.choices[0].text == gen.generate(prompt, max_new_tokens=16)
    assert default.usage.completion_tokens <= 16
    streamed = c.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == want

    # sampling with a seed is reproducible
    seeded = [
        c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0.9, seed=7)
        for _ in range(2)
    ]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text

    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=NAME, messages=MESSAGES, temperature=5)


def _stream(url: str, prompt: str, n: int) -> str:
    c = client(url)
    parts = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                 stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    return "".join(ch.choices[0].text for ch in parts)


def test_eight_concurrent_streams_each_get_their_text_alone(running, gen):
    prompts = [f"{i} little {'pigs ' * i}went to market" for i in range(8)]
    lengths = [16 + 5 * i for i in range(8)]
    got: dict[int, str] = {}

    def work(i):
        got[i] = _stream(running, prompts[i], lengths[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        assert got[i] == gen.generate(p, max_new_tokens=n, ignore_eos=True), f"client {i}"
    metrics = httpx.get(f"{running}/metrics").text
    assert "llmc_running_requests 0" in metrics and "llmc_kv_cache_bytes 0" in metrics
    assert "llmc_time_to_first_token_seconds_count" in metrics


def _hostile(url: str) -> list[tuple[str, httpx.Response]]:
    chat, text = f"{url}/v1/chat/completions", f"{url}/v1/completions"
    ok = {"model": NAME, "messages": MESSAGES, "max_tokens": 4}

    def with_(**fields):
        return json.dumps({**ok, **fields})

    bodies = {
        "malformed JSON": (chat, '{"model": "tiny", "messages": ['),
        "not an object": (chat, "[1, 2, 3]"),
        "empty body": (chat, ""),
        "no model": (chat, json.dumps({"messages": MESSAGES})),
        "no messages": (chat, json.dumps({"model": NAME})),
        "unknown field": (chat, with_(frobnicate=True)),
        "temperature a string": (chat, with_(temperature="hot")),
        "temperature too high": (chat, with_(temperature=7)),
        "temperature NaN": (chat, with_(temperature=float("nan"))),
        "top_p zero": (chat, with_(top_p=0)),
        "max_tokens zero": (chat, with_(max_tokens=0)),
        "max_tokens a string": (chat, with_(max_tokens="10")),
        "max_tokens past the context": (chat, with_(max_tokens=10**6)),
        "n = 3": (chat, with_(n=3)),
        "stream a string": (chat, with_(stream="yes")),
        "stream_options without stream": (chat, with_(stream_options={"include_usage": True})),
        "empty messages": (chat, with_(messages=[])),
        "a bad role": (chat, with_(messages=[{"role": "wizard", "content": "hi"}])),
        "content a number": (chat, with_(messages=[{"role": "user", "content": 42}])),
        "five stop strings": (chat, with_(stop=["a", "b", "c", "d", "e"])),
        "seed a float": (chat, with_(seed=1.5)),
        "tools": (chat, with_(tools=[{"type": "function", "function": {"name": "f"}}])),
        "deeply nested JSON": (chat, "[" * 100000 + "]" * 100000),
        "unknown model": (chat, with_(model="gpt-5")),
        "empty prompt": (text, json.dumps({"model": NAME, "prompt": ""})),
        "prompt past the context": (text, json.dumps({"model": NAME, "prompt": "pig " * 5000})),
        "token id past the vocabulary": (text, json.dumps({"model": NAME, "prompt": [10**9]})),
        "negative token id": (text, json.dumps({"model": NAME, "prompt": [-1]})),
        "echo": (text, json.dumps({"model": NAME, "prompt": "hi", "echo": True})),
    }
    out = [(k, httpx.post(u, content=b, timeout=30)) for k, (u, b) in bodies.items()]
    out.append(("too large", httpx.post(chat, content=b"x" * (5 * 2**20), timeout=30)))
    out.append(("GET on a POST route", httpx.get(chat)))
    out.append(("unknown route", httpx.post(f"{url}/v1/engines", content="{}")))
    return out


def test_hostile_requests_get_4xx_and_the_server_stays_healthy(running):
    answers = _hostile(running)
    assert len(answers) >= 20
    for kind, r in answers:
        assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"], kind
    codes = {kind: r.json()["error"]["code"] for kind, r in answers}
    assert codes["prompt past the context"] == "context_length_exceeded"
    assert codes["unknown model"] == "model_not_found"
    assert dict(answers)["unknown field"].json()["error"]["param"] == "frobnicate"
    assert httpx.get(f"{running}/health").json() == {"status": "ok"}
    r = client(running).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_full_queue_answers_429_with_retry_after(artifact):
    """One place in the batch, none in the queue: of eight requests sent at once, the ones that
    arrive while another runs get 429 (a tiny model finishes one in a fraction of a second, so
    the test sends many rather than timing one)."""
    with server(artifact, "--max-batch", "1", "--max-queue", "0") as (url, _):
        body = {"model": NAME, "prompt": "pigs", "max_tokens": 480, "ignore_eos": True}
        answers: list[httpx.Response] = []

        def ask():
            answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        statuses = sorted(r.status_code for r in answers)
        assert len(answers) == 8 and set(statuses) <= {200, 429} and 200 in statuses, statuses
        busy = [r for r in answers if r.status_code == 429]
        assert busy, statuses
        for r in busy:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert again.status_code == 200


def check_client_that_leaves_is_cancelled(url: str, model: str) -> None:
    """A streaming client that leaves after its first chunk: its request is cancelled and its
    KV cache freed (the request must run long enough for the server to notice)."""
    body = {"model": model, "prompt": "pigs", "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 30
    while "llmc_requests_cancelled_total 1" not in (m := httpx.get(f"{url}/metrics").text):
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    while "llmc_running_requests 0" not in (m := httpx.get(f"{url}/metrics").text):
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert "llmc_kv_cache_bytes 0" in m
    total = next(line for line in m.splitlines() if line.startswith("llmc_completion_tokens"))
    assert float(total.split()[1]) < 400  # it stopped early


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(artifact):
    with server(artifact, "--shutdown-timeout", "30") as (url, proc):
        body = {"model": NAME, "prompt": "pigs", "max_tokens": 300, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)


def test_ray_serve_spreads_requests_over_two_replicas(artifact, gen):
    pytest.importorskip("ray.serve")
    with server(artifact, "--ray", "--replicas", "2", "--threads", "1", timeout=180) as (url, proc):
        prompts = [f"{i} pigs" for i in range(16)]
        replicas: set[str] = set()
        deadline = time.monotonic() + 60
        while len(replicas) < 2:  # Ray's proxy learns of the second replica asynchronously
            assert time.monotonic() < deadline, f"only {replicas} answered"
            answers: dict[int, httpx.Response] = {}

            def ask(i, answers=answers):
                body = {"model": NAME, "prompt": prompts[i], "max_tokens": 24, "temperature": 0}
                answers[i] = httpx.post(f"{url}/v1/completions", json=body, timeout=120)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(150)
            for i, r in answers.items():
                assert r.status_code == 200
                assert r.json()["choices"][0]["text"] == gen.generate(prompts[i], max_new_tokens=24)
            replicas |= {r.headers["x-llmc-replica"] for r in answers.values()}
        assert len(replicas) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0


def test_bench_cli_measures_an_artifact_and_a_server(running, artifact, tmp_path):
    from click.testing import CliRunner

    from llmc.cli import cli

    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", str(artifact), "--url", running, "--clients", "1,2", "--runs", "1"]
    result = CliRunner().invoke(cli, [*args, "--new-tokens", "8", "--json", str(out),
                                      "--plot", str(plot)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["artifacts"][0]["decode_tok_s"] > 0 and data["artifacts"][0]["decode_by_context"]
    waves = data["servers"][0]["by_clients"]
    assert set(waves) == {"1", "2"} and all(w["failures"] == 0 for w in waves.values())
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "decode tok/s" in result.output and "TTFT p50" in result.output


def test_serve_and_bench_refuse_bad_use_with_one_sentence(artifact):
    from click.testing import CliRunner

    from llmc.cli import cli

    cases = [
        (["serve", str(artifact), "--precision", "bf16"], "applies to OpenVINO artifacts"),
        (["serve", str(artifact), "--replicas", "2"], "need --ray"),
        (["serve", "/no/such/artifact"], "does not exist"),
        (["bench"], "at least one ARTIFACT or --url"),
        (["bench", "--url", f"http://127.0.0.1:{free_port()}"], "cannot load"),
        (["bench", str(artifact), "--plot", "out.jpg"], "writes a PNG"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
