"""Decode speed, TTFT, build time, size and peak RSS of llmc vs transformers eager (JSON out).

Protocol (bench/README.md): SmolLM2-135M-Instruct, chat prompt, greedy, exactly 128 new tokens,
2 threads, 1 warm-up then the median of 3 runs; each engine runs in its own process so that its
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper."
NEW_TOKENS = 128
TTFT_TOKENS = 512
ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare-dev.txt"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _long_prompt(encode) -> list[int]:
    text = TEXT.read_text() if TEXT.is_file() else "All the world's a stage. " * 400
    return encode(text[:20000])[:TTFT_TOKENS]


def run_llmc(artifact: str, threads: int, runs: int) -> dict:
    import llmc.runtime as rt

    gen = rt.load(artifact, threads=threads)
    ids = gen.encode(PROMPT, chat=True)
    long_ids = _long_prompt(lambda t: gen.tokenizer.encode(t, add_special_tokens=False))

    def timed(prompt_ids, n):
        stamps, tokens = [], []
        start = time.perf_counter()
        for step in gen.generate_ids([prompt_ids], rt.GenerationConfig(n, ignore_eos=True)):
            stamps.append(time.perf_counter())
            tokens.append(int(step[0]))
        return start, stamps, tokens

    return _measure(timed, ids, long_ids, runs)


def _measure(timed, ids, long_ids, runs: int) -> dict:
    """`timed(prompt_ids, n) -> (start, token arrival times, tokens)`; round 0 is the warm-up."""
    decode, ttft, tokens = [], [], []
    for i in range(runs + 1):
        _, stamps, tokens = timed(ids, NEW_TOKENS)
        start, first, _ = timed(long_ids, 1)
        if i:
            decode.append((NEW_TOKENS - 1) / (stamps[-1] - stamps[0]))
            ttft.append(first[0] - start)
    return {
        "decode_tok_s": statistics.median(decode),
        "ttft512_s": statistics.median(ttft),
        "decode_runs": decode,
        "ttft_runs": ttft,
        "tokens": tokens,
        "peak_rss_mb": _peak_rss_mb(),
    }


class _Stamps:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self):
        pass


def run_transformers(threads: int, runs: int) -> dict:
    import torch

    from llmc.compiler import sources

    torch.set_num_threads(threads)
    loaded = sources.load(sources.resolve(None))
    model, tok = loaded.model, loaded.tokenizer
    messages = [{"role": "user", "content": PROMPT}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    long_ids = _long_prompt(lambda t: tok(t, add_special_tokens=False)["input_ids"])

    def timed(prompt_ids, n):
        stamps = _Stamps()
        x = torch.tensor([prompt_ids])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=stamps,
                pad_token_id=tok.pad_token_id,
            )
        return start, stamps.times, out[0, len(prompt_ids) :].tolist()

    return _measure(timed, ids, long_ids, runs)


def _child(engine: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--engine",
        engine,
        "--artifact",
        args.artifact,
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"the {engine} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(artifact: str) -> dict:
    """Build the artifact in a child process: wall time and that process's peak RSS."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "llmc.cli", "build", "--out", artifact],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"build_s": round(seconds, 1), "build_peak_rss_mb": round(rss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "bench-smollm2-onnx"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="Build even if the artifact exists.")
    parser.add_argument("--engine", choices=["llmc", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    if args.engine:  # child process: one engine, one JSON line
        fn = run_llmc if args.engine == "llmc" else None
        result = (
            fn(args.artifact, args.threads, args.runs)
            if fn
            else run_transformers(args.threads, args.runs)
        )
        print(json.dumps(result))
        return

    build = {}
    if args.rebuild or not (Path(args.artifact) / "llmc.json").is_file():
        build = _build(args.artifact)
    manifest = json.loads((Path(args.artifact) / "llmc.json").read_text())
    build.setdefault("build_s", manifest["build"]["seconds"])
    size = sum(f["size"] for f in manifest["files"].values()) / 1e6
    ours = {**_child("llmc", args), **build, "size_mb": round(size, 1)}
    ref = _child("transformers", args)
    same = next(
        (i for i, (a, b) in enumerate(zip(ours["tokens"], ref["tokens"], strict=False)) if a != b),
        min(len(ours["tokens"]), len(ref["tokens"])),
    )
    report = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct fp32",
            "prompt": PROMPT,
            "chat": True,
            "new_tokens": NEW_TOKENS,
            "ttft_prompt_tokens": TTFT_TOKENS,
            "threads": args.threads,
            "warmup": 1,
            "runs": args.runs,
            "stat": "median",
        },
        "engines": {
            "llmc-onnx": {k: v for k, v in ours.items() if k != "tokens"},
            "transformers-eager": {k: v for k, v in ref.items() if k != "tokens"},
        },
        "greedy_identical_prefix": same,
        "ratios_llmc_over_transformers": {
            "decode_tok_s": round(ours["decode_tok_s"] / ref["decode_tok_s"], 3),
            "ttft512_s": round(ours["ttft512_s"] / ref["ttft512_s"], 3),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
