"""Serving: `llmc serve` under 1, 2, 4, 8 and 16 concurrent streaming clients against OpenVINO
GenAI's continuous-batching pipeline on its model of the same weights, driven at the same
concurrency (JSON out, a plot, and a soak run).

Protocol (bench/README.md, "Serving"): SmolLM2-135M-Instruct; every client a chat prompt of its
own (llmc.benchmark.TOPICS), greedy, exactly 128 new tokens (end of sequence ignored); all clients
of a wave start together; per client count, one warm-up wave then the median of `--runs` waves.
llmc runs as a server process (`llmc serve`, 2 threads) and its clients stream over HTTP from
this process; GenAI has no HTTP server of its own (OpenVINO Model Server is a separate product),
so its clients are requests added to the pipeline in its own process, with a thread stepping it:
what HTTP costs llmc (the clients' parsing takes CPU from the same two cores), GenAI is spared.
`--in-process` adds llmc driven the same way (its batcher in a process of its own, requests
submitted there, no HTTP): the engines side by side, and what the server's HTTP costs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from reference_envs import ROOT, ov_env, ov_model

from llmc import benchmark
from llmc.benchmark import NEW_TOKENS, chat_prompt, summarize

CLIENTS = (1, 2, 4, 8, 16)


# -- llmc serve ---------------------------------------------------------------------------------
def _start(artifact: str, port: int, threads: int, precision: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmc.cli", "serve", artifact, "--port", str(port)]
    cmd += ["--threads", str(threads), "--max-batch", "16", "--max-queue", "64"]
    cmd += ["--precision", precision] if precision else []
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"llmc serve {artifact} did not start")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_llmc(artifact, clients, runs, threads, precision, port) -> dict:
    proc = _start(artifact, port, threads, precision)
    try:
        out = benchmark.load_test(f"http://127.0.0.1:{port}", clients, runs, NEW_TOKENS)
        out["rss_mb"] = _rss_mb(proc.pid)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


async def _soak(url: str, model: str, clients: int, seconds: float, pid: int) -> dict:
    """`clients` clients each sending request after request for `seconds`; the server's RSS
    sampled every 5 s."""
    import httpx

    stop, rss, results = time.perf_counter() + seconds, [], []

    async def client(http, i):
        while time.perf_counter() < stop:
            results.append(await benchmark._client(http, url, model, i, NEW_TOKENS))

    async def sample():
        while time.perf_counter() < stop:
            rss.append(round(_rss_mb(pid), 1))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(sample(), *(client(http, i) for i in range(clients)))
    wave = summarize(results, start)
    third = max(1, len(rss) // 3)
    return {**wave, "requests": len(results), "rss_mb": rss,
            "rss_first_third_mb": statistics.mean(rss[:third]),
            "rss_last_third_mb": statistics.mean(rss[-third:])}  # fmt: skip


def run_soak(artifact, clients, seconds, threads, precision, port) -> dict:
    proc = _start(artifact, port, threads, precision)
    try:
        url = f"http://127.0.0.1:{port}"
        import httpx

        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        result = asyncio.run(_soak(url, model, clients, seconds, proc.pid))
        metrics = httpx.get(f"{url}/metrics").text
        result["final_kv_cache_bytes"] = next(
            float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("llmc_kv_cache_bytes ")
        )  # fmt: skip
        return result
    finally:
        proc.terminate()
        proc.wait(60)


# -- OpenVINO GenAI's continuous batching, in the OpenVINO venv ----------------------------------
def genai_child(model_dir: str, clients, runs: int, threads: int, f32: bool) -> dict:
    import openvino_genai as ov_genai

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 2  # GB of KV blocks: 16 clients x 170 tokens need far less
    scheduler.max_num_seqs = 16
    scheduler.max_num_batched_tokens = 2048
    scheduler.dynamic_split_fuse = True
    props = {"INFERENCE_NUM_THREADS": threads}
    if f32:  # the plugin's defaults compute in bf16 with a u8 KV cache on this CPU
        props.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    pipe = ov_genai.ContinuousBatchingPipeline(model_dir, scheduler, "CPU", props)
    tok = pipe.get_tokenizer()
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = NEW_TOKENS
    config.ignore_eos = True

    def wave(n: int) -> dict:
        prompts = [tok.apply_chat_template(chat_prompt(i), add_generation_prompt=True)
                   for i in range(n)]  # fmt: skip
        start = time.perf_counter()
        handles = [pipe.add_request(i, p, config) for i, p in enumerate(prompts)]
        stamps: list[list[float]] = [[] for _ in range(n)]
        while pipe.has_non_finished_requests():
            pipe.step()
            now = time.perf_counter()
            for i, handle in enumerate(handles):
                if handle.can_read():
                    for output in handle.read().values():
                        stamps[i] += [now] * len(output.generated_ids)
        return summarize([{"ok": True, "start": start, "stamps": s} for s in stamps], start)

    return _waves(wave, clients, runs)


def _waves(wave, clients, runs: int) -> dict:
    """A child's measurement: `wave(n)` for the most clients once (warm-up), then `runs` waves
    per client count, with their medians."""
    wave(max(clients))
    out = {"by_clients": {}}
    for n in clients:
        waves = [wave(n) for _ in range(runs)]
        row = {k: statistics.median(w[k] for w in waves) for k in waves[0] if k != "failures"}
        out["by_clients"][n] = {**row, "failures": sum(w["failures"] for w in waves),
                                "waves": waves}  # fmt: skip
    return out


def _run_child(python, flag: str, target: str, clients, runs, threads, extra=(), env=None):
    """This script as a child (`flag` TARGET ...): its JSON, client counts as ints again."""
    cmd = [str(python), __file__, flag, str(target), "--runs", str(runs)]
    cmd += ["--clients", ",".join(map(str, clients)), "--threads", str(threads), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["by_clients"] = {int(k): v for k, v in out["by_clients"].items()}
    return out


def run_genai(clients, runs, threads, f32: bool) -> dict:
    python = ov_env()
    model = ov_model(python, "fp32")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    extra = ["--f32"] if f32 else []
    return _run_child(python, "--genai-child", model, clients, runs, threads, extra, env)


# -- llmc's batcher without HTTP, driven as GenAI is ---------------------------------------------
def llmc_child(artifact: str, clients, runs: int, threads: int, precision: str | None) -> dict:
    """llmc's continuous batching in this process, loaded as `llmc serve` loads it: requests
    submitted to its batcher, each token's arrival stamped by the callback."""
    import threading

    import llmc.runtime as rt
    from llmc.artifact import read_manifest
    from llmc.runtime.batcher import Batcher
    from llmc.runtime.generator import GenerationConfig
    from llmc.server.run import SWITCH_INTERVAL

    sys.setswitchinterval(SWITCH_INTERVAL)
    options = {"threads": threads, **({"precision": precision} if precision else {})}
    if read_manifest(artifact, check_files=False)["target"]["name"] == "openvino":
        options["pin_threads"] = False  # as llmc serve runs it (cli_serve.py)
    gen = rt.load(artifact, **options)
    batcher = Batcher(gen, max_batch=16, max_queue=64)
    config = GenerationConfig(NEW_TOKENS, ignore_eos=True)

    def wave(n: int) -> dict:
        prompts = [gen.encode(chat_prompt(i), chat=True) for i in range(n)]
        stamps: list[list[float]] = [[] for _ in range(n)]
        left, finished = [n], threading.Event()

        def emit(i, event):
            if isinstance(event, BaseException) or event.finish_reason:
                left[0] -= 1  # the batcher's one thread calls every emit
                if not left[0]:
                    finished.set()
            if not isinstance(event, BaseException):
                stamps[i].append(time.perf_counter())

        start = time.perf_counter()
        for i, ids in enumerate(prompts):
            batcher.submit(ids, config, functools.partial(emit, i))
        finished.wait()
        return summarize([{"ok": bool(s), "start": start, "stamps": s} for s in stamps], start)

    out = _waves(wave, clients, runs)
    batcher.close()
    return out


def run_llmc_in_process(artifact, clients, runs, threads, precision) -> dict:
    extra = ["--precision", precision] if precision else []
    return _run_child(sys.executable, "--llmc-child", artifact, clients, runs, threads, extra)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--llmc",
        action="append",
        default=[],
        metavar="ARTIFACT[:bf16]",
        help="an artifact to serve (repeatable); ':bf16' serves OpenVINO at bf16",
    )
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-genai", action="store_true")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="also drive each artifact's batcher in a process of its own, without HTTP (as "
        "GenAI is driven)",
    )
    p.add_argument("--soak", type=float, default=0, help="seconds of a 16-client soak run")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve.json"))
    p.add_argument("--plot", default=str(ROOT / "bench" / "results" / "serve.png"))
    p.add_argument("--genai-child", help=argparse.SUPPRESS)
    p.add_argument("--f32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--llmc-child", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    clients = tuple(int(c) for c in args.clients.split(","))
    if args.genai_child:
        print(json.dumps(genai_child(args.genai_child, clients, args.runs, args.threads, args.f32)))
        return
    if args.llmc_child:
        child = llmc_child(args.llmc_child, clients, args.runs, args.threads, args.precision)
        print(json.dumps(child))
        return
    engines = {}  # label -> a function running one round (one measured wave per client count)
    for spec in args.llmc:
        artifact, _, precision = spec.partition(":")
        label = f"llmc {Path(artifact).name}" + (f" {precision}" if precision else "")
        engines[label] = functools.partial(
            run_llmc, artifact, clients, 1, args.threads, precision or None, args.port
        )
        if args.in_process:
            engines[f"{label} in-process (no HTTP)"] = functools.partial(
                run_llmc_in_process, artifact, clients, 1, args.threads, precision or None
            )
    if not args.no_genai:
        engines["openvino-genai CB (plugin default: bf16, u8 KV)"] = functools.partial(
            run_genai, clients, 1, args.threads, False
        )
        engines["openvino-genai CB (f32)"] = functools.partial(
            run_genai, clients, 1, args.threads, True
        )
    # rounds: every engine once per round, so that a machine that drifts moves all of them
    rounds: list[dict[str, dict]] = []
    for r in range(args.runs):
        rounds.append({})
        for label, run in engines.items():
            print(f"round {r + 1}/{args.runs}: {label} …", file=sys.stderr)
            rounds[-1][label] = run()
    results = {"clients": clients, "runs": args.runs, "threads": args.threads}
    results["engines"] = {label: _merge([rd[label] for rd in rounds]) for label in engines}
    results["paired"] = _paired(rounds)
    if args.soak:
        for spec in args.llmc[:1]:
            artifact, _, precision = spec.partition(":")
            print(f"soak {args.soak:.0f} s, 16 clients: {artifact} …", file=sys.stderr)
            results["soak"] = run_soak(
                artifact, 16, args.soak, args.threads, precision or None, args.port
            )
    results["ratios"] = _ratios(results["engines"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    servers = [{**r, "label": k, "url": k, "model": k, "new_tokens": NEW_TOKENS}
               for k, r in results["engines"].items()]  # fmt: skip
    benchmark.plot([], servers, args.plot)
    for line in benchmark.table([], servers):
        print(line)
    print(json.dumps({"ratios": results["ratios"], "paired": results["paired"]}, indent=2))


def _merge(rounds: list[dict]) -> dict:
    """One engine's rounds -> per client count the median of its waves, and the waves."""
    out = {k: v for k, v in rounds[0].items() if k != "by_clients"}
    out["by_clients"] = {}
    for n in rounds[0]["by_clients"]:
        waves = [w for r in rounds for w in r["by_clients"][n]["waves"]]
        row = {k: statistics.median(w[k] for w in waves if w[k] is not None)
               for k in waves[0] if k != "failures"}  # fmt: skip
        out["by_clients"][n] = {**row, "failures": sum(w["failures"] for w in waves),
                                "waves": waves}  # fmt: skip
    return out


def _paired(rounds: list[dict[str, dict]]) -> dict:
    """Per llmc engine and GenAI run: the median over rounds of the 8-client throughput ratio
    measured within the round."""
    out = {}
    for label in rounds[0]:
        for ref in rounds[0]:
            if label.startswith("llmc") and ref.startswith("openvino-genai"):
                ratios = [rd[label]["by_clients"][8]["tok_s"] / rd[ref]["by_clients"][8]["tok_s"]
                          for rd in rounds if 8 in rd[label]["by_clients"]]  # fmt: skip
                if ratios:
                    out[f"{label} / {ref}"] = statistics.median(ratios)
    return out


def _ratios(engines: dict) -> dict:
    """Per llmc engine: throughput at 8 clients over its own at 1, and over each GenAI run's."""
    out = {}
    for name, r in engines.items():
        by = r["by_clients"]
        if not name.startswith("llmc") or 8 not in by or 1 not in by:
            continue
        out[name] = {"8_over_1": by[8]["tok_s"] / by[1]["tok_s"]}
        for ref, rr in engines.items():
            if ref.startswith("openvino-genai") and 8 in rr["by_clients"]:
                out[name][f"8 clients / {ref}"] = by[8]["tok_s"] / rr["by_clients"][8]["tok_s"]
    return out


if __name__ == "__main__":
    main()
