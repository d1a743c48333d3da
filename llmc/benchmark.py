"""`llmc bench`: the bench protocol (bench/README.md) for any artifacts and servers, from the CLI.

Per artifact: decode tokens/s (greedy, NEW_TOKENS new tokens after the story chat prompt), time
to first token of a TTFT_TOKENS prompt, and decode tokens/s against the context length already
in the cache. Per server URL: concurrent streaming clients (each a varied chat prompt, greedy,
end-of-sequence ignored): aggregate tokens/s, time to first token and inter-token latency
percentiles, failures. Medians over `runs` rounds after a warm-up. Speed claims in the README
come from bench/ scripts, which add the reference engines in the same run."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

NEW_TOKENS = 128
TTFT_TOKENS = 512
STORY = "Write a long story about {}."
TOPICS = [
    "a lighthouse keeper", "a dragon who cannot fly", "a baker in Lyon", "a lost robot",
    "a sailor and a storm", "a cat that talks", "a city under the sea", "a secret garden",
    "a broken violin", "a mountain village", "a river that flows uphill", "a clock maker",
    "the last train home", "a forest at night", "a comet", "a library of lost books",
]  # fmt: skip
CONTEXTS = (128, 512, 1024)
EMPTY = '"content": ""'


def chat_prompt(client: int) -> list[dict]:
    """Client i's chat messages: the story prompt about its own topic."""
    return [{"role": "user", "content": STORY.format(TOPICS[client % len(TOPICS)])}]


def _text(tokens: int) -> str:
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare-dev.txt"
    text = data.read_text() if data.is_file() else "All the world's a stage, and all the men "
    return (text * (1 + 8 * tokens // len(text)))[: 8 * tokens]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- one artifact, in this process -------------------------------------------------------------
def profile_artifact(path, runs: int = 3, threads: int | None = None, contexts=CONTEXTS, **options):
    """Decode tokens/s, TTFT of a TTFT_TOKENS prompt, and tokens/s against the context length."""
    import llmc.runtime as rt

    gen = rt.load(path, threads=threads, **options)
    story = gen.encode(chat_prompt(0))
    long = gen.tokenizer.encode(_text(max(TTFT_TOKENS, *contexts)), add_special_tokens=False)
    contexts = [c for c in contexts if c + 32 < gen.model.max_context]

    def decode_rate(ids: list[int], n: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s of the rest) for one prompt."""
        seq = gen.model.sequence()
        start = time.perf_counter()
        token = seq.prefill([ids]).argmax(-1)[:, None]
        first = time.perf_counter()
        for _ in range(n - 1):
            token = seq.decode(token).argmax(-1)[:, None]
        return first - start, (n - 1) / (time.perf_counter() - first)

    decode, ttft, by_context = [], [], {c: [] for c in contexts}
    for round_ in range(runs + 1):  # round 0 warms up
        rate = decode_rate(story, NEW_TOKENS)[1]
        first = decode_rate(long[:TTFT_TOKENS], 1)[0]
        rates = {c: decode_rate(long[:c], 33)[1] for c in contexts}
        if round_:
            decode.append(rate)
            ttft.append(first)
            for c in contexts:
                by_context[c].append(rates[c])
    return {
        "artifact": str(path),
        "name": Path(path).name,
        "target": gen.manifest["target"]["name"],
        "quantization": (gen.manifest.get("quantization") or {}).get("method", "fp32"),
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(ttft),
        "decode_by_context": {c: statistics.median(v) for c, v in by_context.items()},
        "runs": runs,
    }


# -- a server, over HTTP ------------------------------------------------------------------------
async def _client(http, url: str, model: str, i: int, new_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": chat_prompt(i),
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    start, stamps = time.perf_counter(), []
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                # a chunk with text (not the role's empty one): cheap to tell without parsing,
                # which would take CPU from the server on the same machine
                if line.startswith("data: {") and '"content": "' in line and EMPTY not in line:
                    stamps.append(time.perf_counter())
    except Exception as exc:  # a failed request is counted, never fatal to the run
        return {"ok": False, "status": type(exc).__name__}
    return {"ok": bool(stamps), "start": start, "stamps": stamps}


async def _wave(url: str, model: str, clients: int, new_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(_client(http, url, model, i, new_tokens) for i in range(clients))
        )
    return summarize(results, start)


def summarize(results: list[dict], start: float) -> dict:
    """One wave of clients -> aggregate tokens/s, TTFT and inter-token latency percentiles."""
    done = [r for r in results if r["ok"]]
    ttft = [r["stamps"][0] - r["start"] for r in done]
    gaps = [b - a for r in done for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    end = max((r["stamps"][-1] for r in done), default=start)
    tokens = sum(len(r["stamps"]) for r in done)
    return {
        "tok_s": tokens / (end - start) if end > start else 0.0,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
        "failures": len(results) - len(done),
    }


def load_test(url: str, clients=(1, 2, 4, 8), runs: int = 3, new_tokens: int = NEW_TOKENS):
    """Concurrent streaming clients against a server: per number of clients, the medians over
    `runs` waves (after a warm-up wave) and the failures of all of them."""
    import httpx

    url = url.rstrip("/")
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(_wave(url, model, max(clients), 8))  # warm-up
    out = {"url": url, "model": model, "new_tokens": new_tokens, "by_clients": {}}
    for n in clients:
        waves = [asyncio.run(_wave(url, model, n, new_tokens)) for _ in range(runs)]
        row = {k: statistics.median(w[k] for w in waves if w[k] is not None) for k in waves[0]
               if k != "failures" and any(w[k] is not None for w in waves)}  # fmt: skip
        row["failures"] = sum(w["failures"] for w in waves)
        row["waves"] = waves
        out["by_clients"][n] = row
    return out


# -- output --------------------------------------------------------------------------------------
def table(artifacts: list[dict], servers: list[dict]) -> list[str]:
    """Plain-text tables of the results."""
    lines = []
    if artifacts:
        contexts = sorted({c for a in artifacts for c in a["decode_by_context"]})
        head = f"{'artifact':<34} {'target':<9} {'decode tok/s':>12} {'TTFT 512':>9}"
        lines.append(head + "".join(f" {'@' + str(c):>7}" for c in contexts))
        for a in artifacts:
            row = f"{a['name'][:34]:<34} {a['target']:<9} {a['decode_tok_s']:>12.1f} "
            row += f"{a['ttft_s']:>8.3f}s"
            row += "".join(
                f" {a['decode_by_context'].get(c, float('nan')):>7.1f}" for c in contexts
            )
            lines.append(row)
    for s in servers:
        lines.append(f"{s['url']} ({s['model']}), {s['new_tokens']} new tokens per client")
        lines.append(f"{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} "
                     f"{'p95':>7} {'failed':>6}")  # fmt: skip
        for n, r in s["by_clients"].items():
            lines.append(
                f"{n:>7} {r['tok_s']:>8.1f} {_ms(r.get('ttft_p50')):>9} {_ms(r.get('ttft_p95')):>7}"
                f" {_ms(r.get('itl_p50')):>8} {_ms(r.get('itl_p95')):>7} {r['failures']:>6}"
            )
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def plot(artifacts: list[dict], servers: list[dict], out) -> None:
    """A figure of the results: decode tokens/s and TTFT per artifact, tokens/s against context
    length, and per server throughput and latency against the number of clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (3 if artifacts else 0) + (3 if servers else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if artifacts:
        names = [a["name"] for a in artifacts]
        ax = axes.pop(0)
        ax.barh(names, [a["decode_tok_s"] for a in artifacts], color="tab:blue")
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_title(f"Decode, {NEW_TOKENS} new tokens")
        ax = axes.pop(0)
        ax.barh(names, [a["ttft_s"] * 1000 for a in artifacts], color="tab:orange")
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(f"Time to first token, {TTFT_TOKENS}-token prompt")
        ax = axes.pop(0)
        for a in artifacts:
            contexts = sorted(a["decode_by_context"])
            ax.plot(contexts, [a["decode_by_context"][c] for c in contexts], "o-", label=a["name"])
        ax.set_xlabel("tokens already in the context")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Decode speed against context length")
        ax.legend(fontsize=7)
    if servers:
        tp, ttft, itl = axes
        colors = plt.get_cmap("tab10")
        for i, s in enumerate(servers):
            n = sorted(s["by_clients"])
            rows = [s["by_clients"][k] for k in n]
            style = {"color": colors(i % 10), "marker": "o"}
            tp.plot(n, [r["tok_s"] for r in rows], label=s.get("label", s["model"]), **style)
            for ax, key in ((ttft, "ttft"), (itl, "itl")):
                ax.plot(n, [1000 * (r.get(f"{key}_p50") or 0) for r in rows], **style)
                ax.plot(n, [1000 * (r.get(f"{key}_p95") or 0) for r in rows], ls=":",
                        color=style["color"])  # fmt: skip
        tp.set_ylabel("aggregate tokens/s (higher is better)")
        tp.set_title("Server throughput")
        tp.legend(fontsize=7, loc="upper left")
        ttft.set_ylabel("ms (lower is better)")
        ttft.set_title("Time to first token (p50; dotted: p95)")
        itl.set_ylabel("ms (lower is better)")
        itl.set_title("Inter-token latency (p50; dotted: p95)")
        for ax in (tp, ttft, itl):
            ax.set_xscale("log", base=2)
            ticks = sorted({k for s in servers for k in s["by_clients"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("concurrent streaming clients")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
