"""Decode speed, TTFT, build time, size and peak RSS of llmc vs the target's own engine
(onnxruntime-genai for onnx, OpenVINO GenAI on optimum-intel's export for openvino, PyTorch
for inductor) and transformers eager (JSON out).

Protocol (bench/README.md): SmolLM2-135M-Instruct, chat prompt, greedy, exactly 128 new tokens,
2 threads, 1 warm-up then the median of 3 runs; each engine runs in its own process so that its
peak RSS is its own. onnxruntime-genai lives in its own environment (bench/.venv-ref, created on
first use, layered over the project's .venv) so the project never depends on it; OpenVINO GenAI
and optimum-intel likewise in bench/.venv-ov (optimum-intel pins transformers < 5.6).
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

from engines import (
    NEW_TOKENS,
    PROMPT,
    ROOT,
    TTFT_TOKENS,
    run_llmc,
    run_ort_genai,
    run_ov_genai,
    run_transformers,
)
from reference_envs import ov_env, ov_model, reference_env, reference_model


def _child(
    engine: str, args, python: str | None = None, extra: list[str] = (), artifact: str = ""
) -> dict:
    """One round of one engine in a fresh process: a warm-up, then `--runs-per-child` runs."""
    cmd = [
        python or sys.executable,
        __file__,
        "--engine",
        engine,
        "--artifact",
        artifact or args.artifact,
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs_per_child),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"the {engine} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(artifact: str, target: str, precision: str) -> dict:
    """Build the artifact in a child process: wall time and that process's peak RSS."""
    start = time.perf_counter()
    quant = [] if precision == "fp32" else ["--quant", precision]
    subprocess.run(
        [sys.executable, "-m", "llmc.cli", "build", "-t", target, "--out", artifact, *quant],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"build_s": round(seconds, 1), "build_peak_rss_mb": round(rss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        choices=["onnx", "openvino", "tvm", "inductor"],
        default="onnx",
        help="onnx: vs onnxruntime-genai; openvino: vs OpenVINO GenAI on optimum-intel's IR; "
        "tvm: vs llmc's ONNX artifact of the same precision and onnxruntime-genai; inductor: "
        "vs transformers eager (its own engine is PyTorch).",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8", "int4"],
        default="fp32",
        help="fp32, or llmc --quant int8/int4 vs the reference's int8/int4 model.",
    )
    parser.add_argument("--artifact", help="Default: artifacts/bench-smollm2-TARGET[-PRECISION].")
    parser.add_argument(
        "--ov-hint",
        choices=["f32", "bf16"],
        default="f32",
        help="openvino: the compute precision of both engines (f32: exact, llmc's default).",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="Exact kernels: llmc's exact=True, and OpenVINO GenAI without dynamic quantization "
        "(default: each engine's default kernels; the JSON says which each ran).",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Rounds (one process per engine).")
    parser.add_argument("--runs-per-child", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rebuild", action="store_true", help="Build even if the artifact exists.")
    parser.add_argument(
        "--engine",
        choices=["llmc", "transformers", "ort-genai", "ov-genai"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--ref-model", help=argparse.SUPPRESS)
    parser.add_argument("--skip-transformers", action="store_true", help="No transformers eager.")
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    if args.artifact is None:
        suffix = "" if args.precision == "fp32" else f"-{args.precision}"
        args.artifact = str(ROOT / "artifacts" / f"bench-smollm2-{args.target}{suffix}")
    if args.engine:  # child process: one engine, one JSON line
        if args.engine == "llmc":
            hint = args.ov_hint if args.target == "openvino" else None
            result = run_llmc(args.artifact, args.threads, args.runs, hint, args.exact)
        elif args.engine == "ort-genai":
            result = run_ort_genai(args.ref_model, args.artifact, args.threads, args.runs)
        elif args.engine == "ov-genai":
            model, hint = args.ref_model, args.ov_hint
            result = run_ov_genai(model, args.artifact, args.threads, args.runs, hint, args.exact)
        else:
            result = run_transformers(args.threads, args.runs)
        print(json.dumps(result))
        return

    build = {}
    if args.rebuild or not (Path(args.artifact) / "llmc.json").is_file():
        build = _build(args.artifact, args.target, args.precision)
    manifest = json.loads((Path(args.artifact) / "llmc.json").read_text())
    build.setdefault("build_s", manifest["build"]["seconds"])
    size = sum(f["size"] for f in manifest["files"].values()) / 1e6
    ours_name = f"llmc-{args.target}"
    extra = ["--target", args.target, "--ov-hint", args.ov_hint, *(["--exact"] * args.exact)]
    children = {ours_name: lambda: _child("llmc", args, extra=extra)}
    if args.target == "tvm":  # llmc's ONNX artifact of the same precision, built if missing
        onnx_artifact = args.artifact.replace("-tvm", "-onnx")
        if not (Path(onnx_artifact) / "llmc.json").is_file():
            _build(onnx_artifact, "onnx", args.precision)
        onnx_extra = ["--target", "onnx", "--ov-hint", args.ov_hint, *(["--exact"] * args.exact)]
        children["llmc-onnx"] = lambda: _child(
            "llmc", args, extra=onnx_extra, artifact=onnx_artifact
        )
    if args.target in ("onnx", "tvm"):
        python = reference_env()
        ref = ["--ref-model", str(reference_model(python, args.precision))]
        children["onnxruntime-genai"] = lambda: _child("ort-genai", args, str(python), ref)
    elif args.target == "openvino":
        python = ov_env()
        ref = ["--ref-model", str(ov_model(python, args.precision))]
        ref += extra
        children["openvino-genai"] = lambda: _child("ov-genai", args, str(python), ref)
    if not args.skip_transformers and args.precision == "fp32":
        children["transformers-eager"] = lambda: _child("transformers", args)
    # Rounds interleave the engines, so that a slow spell of this shared machine hits all alike.
    rounds: dict[str, list[dict]] = {name: [] for name in children}
    for _ in range(args.runs):
        for name, child in children.items():
            rounds[name].append(child())
    engines = {name: _merge(results) for name, results in rounds.items()}
    ours = engines[ours_name] = {**engines[ours_name], **build, "size_mb": round(size, 1)}
    report = {
        "protocol": {
            "model": f"SmolLM2-135M-Instruct {args.precision}",
            "target": args.target,
            **({"openvino_precision_hint": args.ov_hint} if args.target == "openvino" else {}),
            "prompt": PROMPT,
            "chat": True,
            "new_tokens": NEW_TOKENS,
            "ttft_prompt_tokens": TTFT_TOKENS,
            "threads": args.threads,
            "warmup": "1 per process",
            "rounds": args.runs,
            "order": "interleaved: each round runs every engine once, in its own process",
            "stat": "median",
        },
        "engines": {
            name: {k: v for k, v in result.items() if k != "tokens"}
            for name, result in engines.items()
        },
    }
    for name, result in engines.items():
        if name == ours_name:
            continue
        key = name.split("-")[0] if name.startswith("transformers") else name
        report[f"greedy_identical_prefix_vs_{key}"] = _same_prefix(ours["tokens"], result["tokens"])
        report[f"ratios_llmc_over_{key}"] = {
            "decode_tok_s": round(ours["decode_tok_s"] / result["decode_tok_s"], 3),
            "ttft512_s": round(ours["ttft512_s"] / result["ttft512_s"], 3),
            # each round's llmc figure over the other engine's figure of the same round (they
            # ran back to back), then the median: steadier when the machine drifts
            "decode_tok_s_paired": _paired(ours["decode_runs"], result["decode_runs"]),
            "ttft512_s_paired": _paired(ours["ttft_runs"], result["ttft_runs"]),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def _merge(results: list[dict]) -> dict:
    """Medians over rounds; the per-round figures are kept beside them."""
    decode = [x for r in results for x in r["decode_runs"]]
    ttft = [x for r in results for x in r["ttft_runs"]]
    return {
        **results[-1],
        "decode_tok_s": statistics.median(decode),
        "ttft512_s": statistics.median(ttft),
        "decode_runs": decode,
        "ttft_runs": ttft,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
    }


def _paired(ours: list[float], theirs: list[float]) -> float:
    pairs = zip(ours, theirs, strict=True)
    return round(statistics.median(a / b for a, b in pairs), 3)


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines agree on."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
