"""llmc's --compat artifacts in the vendors' own runtimes, against each vendor's own model of the
same weights, in the same run (JSON out).

- onnxruntime-genai (og.Model, og.Generator) on `llmc build -t onnx --compat onnxruntime-genai`
  against the same onnxruntime-genai on its model builder's model;
- OpenVINO GenAI (LLMPipeline, its default attention backend) on `llmc build -t openvino
  --compat openvino-genai` against the same LLMPipeline on optimum-intel's IR, at f32 inference
  (INFERENCE_PRECISION_HINT=f32, KV cache f32: the numbers llmc verifies) and at the plugin's
  defaults (bf16 on CPUs with AVX512-BF16 or AMX; each IR's own KV cache precision);
- llmc's own runtime on the same compat artifacts, beside them.
Both sides of each pair run the same vendor package (the project's `vendors` extra). Each
engine runs in its own process; rounds interleave the engines; medians (bench/README.md's
protocol: SmolLM2-135M-Instruct, chat prompt, 128 greedy tokens, 2 threads, TTFT on 512 tokens).
Missing artifacts are built (`_build`: int8 per output channel for OpenVINO).
Greedy tokens are compared with PyTorch's over the 128 tokens: fp32 with transformers eager,
int8 with the quantized graph run in PyTorch (what the build verifies against).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_decode import _merge, _paired, _same_prefix
from engines import NEW_TOKENS, PROMPT, ROOT, _measure, _prompts, ov_timed, run_llmc, run_ort_genai
from reference_envs import ov_env, ov_model, reference_env, reference_model

COMPAT = {"onnx": "onnxruntime-genai", "openvino": "openvino-genai"}
CONFIGS = {  # OpenVINO GenAI's compile properties beyond threads and latency
    "f32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
    "defaults": {},
}


def artifact_path(target: str, precision: str) -> Path:
    suffix = "" if precision == "fp32" else f"-{precision}"
    return ROOT / "artifacts" / f"bench-smollm2-{target}{suffix}-compat"


def run_ov_vendor(model_dir: str, artifact: str, threads: int, runs: int, config: str) -> dict:
    import openvino_genai as ov_genai

    props = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", **props, **CONFIGS[config])
    ids, long_ids = _prompts(artifact)
    return {**_measure(ov_timed(pipe), ids, long_ids, runs), "version": ov_genai.__version__}


def pytorch_tokens(precision: str, prompt: list[int], group: int = 32) -> list[int]:
    """PyTorch's 128 greedy tokens after the prompt: transformers eager (fp32) or the quantized
    graph run in PyTorch (what the build verifies against), with the artifact's group size."""
    from llmc.build import Progress, _trace
    from llmc.compiler import sources
    from llmc.compiler.pass_manager import PassContext, run_pipeline, select
    from llmc.compiler.verify import greedy
    from llmc.config import BuildConfig
    from llmc.targets import get

    loaded = sources.load(sources.resolve(None))
    graph = None
    if precision != "fp32":
        config = BuildConfig(target="onnx", quant=precision, group_size=group)
        passes = select(get("onnx").pipeline(quant=config.quant_config()), None, ())
        ctx = PassContext()
        graph = _trace(config, loaded, passes, ctx, Progress())
        run_pipeline(graph, passes, ctx)
    return greedy(loaded.model, graph, [prompt], NEW_TOKENS)[0]


def _build(target: str, precision: str, out: Path) -> None:
    """The compat artifact: int8 for OpenVINO per output channel (--group-size 0), the form
    its compressed-weight kernels run fastest (SmolLM2 int8 in groups of 32: about 0.8x as fast
    in LLMPipeline), like optimum-intel's own int8."""
    import subprocess

    cmd = [sys.executable, "-m", "llmc.cli", "build", "-t", target, "--out", str(out)]
    cmd += ["--compat", COMPAT[target]]
    if precision != "fp32":
        cmd += ["--quant", precision, "--drift-tokens", "0"]
        cmd += ["--group-size", "0"] if target == "openvino" else []
    subprocess.run(cmd, check=True)


def _group(artifact: Path) -> int:
    """The quantization group size an artifact was built with (0: one group per row)."""
    quant = json.loads((artifact / "llmc.json").read_text()).get("quantization") or {}
    return quant.get("group_size", 32)


def _target(engine: str) -> str:
    return "onnx" if "onnx" in engine else "openvino"


def _child(engine: str, args, **extra) -> dict:
    import os
    import subprocess

    cmd = [sys.executable, __file__, "--engine", engine, "--threads", str(args.threads)]
    cmd += ["--precision", args.precision]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"the {engine} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "int8", "int4"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Rounds (one process per engine).")
    parser.add_argument(
        "--engines",
        help="Only engines whose names start with these (comma-separated), e.g. "
        "onnxruntime-genai,openvino-genai-f32: more rounds in the same time.",
    )
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # child process: one engine, one JSON line
        if args.engine == "reference":
            prompt, _ = _prompts(args.artifact)
            group = _group(Path(args.artifact))
            result = {"tokens": pytorch_tokens(args.precision, prompt, group)}
        elif args.engine == "llmc":
            result = run_llmc(args.artifact, args.threads, 1, None, False)
        elif args.engine == "og":
            result = run_ort_genai(args.model, args.artifact, args.threads, 1)
        else:
            result = run_ov_vendor(args.model, args.artifact, args.threads, 1, args.config)
        print(json.dumps(result))
        return

    ours = {t: artifact_path(t, args.precision) for t in ("onnx", "openvino")}
    for target, path in ours.items():
        if not (path / "llmc.json").is_file():
            _build(target, args.precision, path)
    theirs = {
        "onnx": reference_model(reference_env(), args.precision),
        "openvino": ov_model(ov_env(), args.precision),
    }
    og_a, ov_a = str(ours["onnx"]), str(ours["openvino"])
    children = {
        "onnxruntime-genai/llmc": lambda: _child("og", args, model=og_a, artifact=og_a),
        "onnxruntime-genai/own": lambda: _child("og", args, model=theirs["onnx"], artifact=og_a),
        "llmc/onnx-compat": lambda: _child("llmc", args, artifact=og_a),
        "llmc/openvino-compat": lambda: _child("llmc", args, artifact=ov_a),
    }
    for config in CONFIGS:
        for side, model in (("llmc", ov_a), ("own", theirs["openvino"])):
            children[f"openvino-genai-{config}/{side}"] = lambda model=model, config=config: _child(
                "ov", args, model=model, artifact=ov_a, config=config
            )
    # PyTorch's tokens, each in its own process (its memory is not the engines' peak RSS)
    references = {
        target: _child("reference", args, artifact=str(path))["tokens"]
        for target, path in ours.items()
    }
    if args.engines:
        wanted = tuple(args.engines.split(","))
        children = {k: v for k, v in children.items() if k.startswith(wanted)}
    rounds: dict[str, list[dict]] = {name: [] for name in children}
    for _ in range(args.runs):
        for name, child in children.items():
            rounds[name].append(child())
    engines = {name: _merge(results) for name, results in rounds.items()}
    report = {
        "protocol": {
            "model": f"SmolLM2-135M-Instruct {args.precision}",
            "prompt": PROMPT,
            "chat": True,
            "new_tokens": NEW_TOKENS,
            "threads": args.threads,
            "rounds": args.runs,
            "order": "interleaved: each round runs every engine once, in its own process",
            "stat": "median",
            "engines": args.engines or "all",
            "openvino_genai_configs": CONFIGS,
            "own_models": {k: str(v) for k, v in theirs.items()},
            "artifacts": {k: str(v) for k, v in ours.items()},
        },
        "engines": {
            name: {k: v for k, v in r.items() if k != "tokens"} for name, r in engines.items()
        },
        # leading greedy tokens each engine shares with PyTorch (of 128), against the reference
        # of its artifact's weights (own models: the fp32 reference only)
        # leading greedy tokens each engine shares with PyTorch's (of 128): the reference of
        # the weights of the llmc artifact its runtime loads (for int8, own models have their own)
        "greedy_identical_prefix": {
            name: _same_prefix(r["tokens"], references[_target(name)])
            for name, r in engines.items()
        },
        "ratios_llmc_artifact_over_own_model": {},
    }
    pairs = [("onnxruntime-genai", "onnxruntime-genai")]
    pairs += [(f"openvino-genai-{c}", f"openvino-genai-{c}") for c in CONFIGS]
    for runtime, _ in pairs:
        if f"{runtime}/llmc" not in engines or f"{runtime}/own" not in engines:
            continue
        a, b = engines[f"{runtime}/llmc"], engines[f"{runtime}/own"]
        report["ratios_llmc_artifact_over_own_model"][runtime] = {
            "decode_tok_s": round(a["decode_tok_s"] / b["decode_tok_s"], 3),
            "decode_tok_s_paired": _paired(a["decode_runs"], b["decode_runs"]),
            "ttft512_s": round(a["ttft512_s"] / b["ttft512_s"], 3),
            "peak_rss": round(a["peak_rss_mb"] / b["peak_rss_mb"], 3),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
