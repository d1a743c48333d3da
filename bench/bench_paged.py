"""OpenVINO step costs: the runtime's paged-attention rewrite against the stateful model (with its
static one-token decode copy) on the same artifact (JSON out).

Protocol: each form in its own process per round, rounds interleaved (this machine drifts);
per round, a 200-token prompt (TTFT), 64 decode steps, 16 verification steps of 5 tokens each
rolled back by 4 (what speculative decoding runs), and 32 decode steps of 8 rows at once
(continuous batching); medians of the steps, then of the rounds; each process's peak RSS.
Ratios are paged / stateful (below 1: the paged form is faster or smaller).

    python bench/bench_paged.py [--artifact artifacts/bench-smollm2-openvino] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmc.host import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
FORMS = {"paged": True, "stateful": False}


def measure(artifact: str, paged: bool, threads: int) -> dict:
    import numpy as np

    import llmc.runtime as rt

    start = time.perf_counter()
    gen = rt.load(artifact, threads=threads, paged=paged)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    vocab = gen.model.vocab_size
    seq = gen.model.sequence()
    start = time.perf_counter()
    seq.prefill(rng.integers(0, vocab, (1, 200)))
    ttft = time.perf_counter() - start

    def timed(step, count: int) -> float:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    decode = timed(lambda: seq.decode(rng.integers(0, vocab, (1, 1))), 64)

    def verify():
        seq.extend(rng.integers(0, vocab, (1, 5)))
        seq.truncate(seq.lengths - 4)

    verify5 = timed(verify, 16)
    batch = gen.model.sequence()
    batch.prefill(rng.integers(0, vocab, (8, 100)))
    batch8 = timed(lambda: batch.decode(rng.integers(0, vocab, (8, 1))), 32)
    rss = peak_rss_mb()
    return {
        "load_s": load_s,
        "ttft_200_ms": ttft * 1e3,
        "decode_ms": decode * 1e3,
        "verify5_ms": verify5 * 1e3,
        "verify5_over_decode": verify5 / decode,
        "batch8_decode_ms": batch8 * 1e3,
        "peak_rss_mb": rss,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "artifacts" / "bench-smollm2-openvino"
    parser.add_argument("--artifact", default=str(default))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "paged.json")
    parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.form:  # child: one form, one JSON line
        print(json.dumps(measure(args.artifact, FORMS[args.form], args.threads)))
        return
    rounds: dict[str, list[dict]] = {form: [] for form in FORMS}
    for r in range(args.runs):
        for form in FORMS:
            print(f"round {r + 1}/{args.runs}: {form} …", file=sys.stderr)
            cmd = [sys.executable, __file__, "--artifact", args.artifact, "--form", form]
            cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rounds[form].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {
        form: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        for form, rs in rounds.items()
    }
    paired = {
        k: round(
            statistics.median(
                p[k] / s[k] for p, s in zip(rounds["paged"], rounds["stateful"], strict=True)
            ),
            3,
        )
        for k in medians["paged"]
    }
    report = {
        "artifact": args.artifact,
        "threads": args.threads,
        "runs": args.runs,
        "medians": medians,
        "paged_over_stateful_paired": paired,
        "rounds": rounds,
    }
    text = json.dumps(report, indent=2)
    print(json.dumps({"medians": medians, "paged_over_stateful_paired": paired}, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
