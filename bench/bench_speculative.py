"""Speculative decoding: llmc plain / prompt lookup / self-speculation vs the target's own engine
(onnxruntime-genai's n-gram decoding, OpenVINO GenAI's prompt lookup) and its plain decode (JSON).

Protocol (bench/README.md): SmolLM2-135M-Instruct, two input-grounded chat prompts (a passage to
copy with edits, a list to continue) and a free one, greedy, exactly 128 new tokens, 2 threads,
the same prompt ids for every engine; each round runs every engine once in a fresh process (per
task a warm-up, then one measured run); medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_decode import _same_prefix
from engines import NEW_TOKENS, PROMPT, ROOT, _peak_rss_mb
from reference_envs import ov_env, ov_model, ov_stamps, reference_env, reference_model

SOURCE = '''\
class LRUCache:
    """A fixed-size cache that forgets the least recently used entry first."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.entries = {}
        self.order = []
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        if key not in self.entries:
            self.misses += 1
            return default
        self.hits += 1
        self.order.remove(key)
        self.order.append(key)
        return self.entries[key]

    def put(self, key, value):
        if key in self.entries:
            self.order.remove(key)
        elif len(self.entries) >= self.capacity:
            oldest = self.order.pop(0)
            del self.entries[oldest]
        self.entries[key] = value
        self.order.append(key)

    def stats(self):
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        return {"hits": self.hits, "misses": self.misses, "hit_rate": rate}

    def resize(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        while len(self.entries) > capacity:
            oldest = self.order.pop(0)
            del self.entries[oldest]
        self.capacity = capacity

    def __len__(self):
        return len(self.entries)

    def __contains__(self, key):
        return key in self.entries
'''
TASKS = {
    "grounded": "Rewrite the following Python code, renaming the attribute `entries` to `items` "
    f"everywhere. Reply with the complete code only.\n\n```python\n{SOURCE}```",
    "list": "Continue this inventory list with twelve more entries in exactly the same format."
    "\n\n"
    + "\n".join(
        f"{i}. Item {i}: weight {3 * i} kg, colour {colour}, stored in aisle {i % 4 + 1}"
        for i, colour in enumerate(["red", "blue", "green", "black", "white", "grey"] * 2, 1)
    ),
    "free": PROMPT,
}
# Reference engines' settings without --num-draft/--ngram: their docs' starting points (README).
ORT_K, ORT_NGRAM = 4, 3  # onnxruntime-genai: max_draft_tokens (its default), ngram_size
OV_K, OV_NGRAM = 5, 3  # OpenVINO GenAI: num_assistant_tokens, max_ngram_size (its sample's)
LLMC = ["llmc", "llmc-prompt-lookup", "llmc-self-spec"]
REFERENCES = {
    "onnx": ["onnxruntime-genai", "onnxruntime-genai-ngram"],
    "openvino": ["openvino-genai", "openvino-genai-pa", "openvino-genai-prompt-lookup"],
}


def _measure(timed, prompts: dict[str, list[int]], runs: int) -> dict:
    """`timed(ids) -> (token arrival times, tokens, counters)`; per task a warm-up, then `runs`."""
    tasks = {}
    for task, ids in prompts.items():
        rates = []
        for i in range(runs + 1):
            stamps, tokens, counters = timed(ids)
            if i:
                rates.append((len(tokens) - 1) / (stamps[-1] - stamps[0]))
        tasks[task] = {"decode_runs": rates, "tokens": tokens, **counters}
    return {"tasks": tasks, "peak_rss_mb": _peak_rss_mb()}


def run_llmc(args, prompts: dict[str, list[int]]) -> dict:
    import llmc.runtime as rt

    options = {"precision": "f32"} if args.target == "openvino" else {}  # as bench_decode.py
    gen = rt.load(args.artifact, threads=args.threads, **options)
    kwargs = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    if args.engine == "llmc-prompt-lookup":
        kwargs["draft"] = "prompt-lookup"
    elif args.engine == "llmc-self-spec":
        kwargs["draft"] = rt.load(args.draft_artifact, threads=args.threads, spin=False, **options)
    if "draft" in kwargs and args.num_draft:
        kwargs["num_draft"] = args.num_draft

    def timed(ids):
        stamps, tokens, usage = [], [], None
        for event in gen.events(ids, **kwargs):
            stamps.append(time.perf_counter())
            tokens.append(int(event.token))
            usage = event.usage or usage
        counters = {k: getattr(usage, k, None) for k in ("drafted", "accepted", "steps")}
        return stamps, tokens, counters

    return _measure(timed, prompts, 1)


def run_ort_genai(args, prompts: dict[str, list[int]]) -> dict:
    """og.Generator as in bench_decode.py; -ngram: its n-gram decoding, switched on per request
    by GeneratorParams.set_speculative_options(ngram_size=N, max_draft_tokens=K)."""
    import onnxruntime_genai as og

    config = og.Config(args.ref_model)
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    ngram = args.engine.endswith("-ngram")
    spec = {"ngram_size": args.ngram or ORT_NGRAM, "max_draft_tokens": args.num_draft or ORT_K}

    def timed(ids):
        params = og.GeneratorParams(model)
        total = len(ids) + NEW_TOKENS  # its shared KV buffer is sized to max_length
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        if ngram:
            params.set_speculative_options(**spec)
        generator = og.Generator(model, params)
        stamps, tokens = [], []
        generator.append_tokens(ids)
        while not generator.is_done():  # one token per call; a round's tokens come buffered
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            tokens.append(int(generator.get_next_tokens()[0]))
        if not ngram:
            return stamps, tokens, {"steps": len(tokens) - 1}
        s = generator.get_speculative_stats()
        counters = {"drafted": int(s["draft_tokens_proposed"])}
        counters["accepted"] = int(s["draft_tokens_accepted"])
        # forward passes after the prefill: verify and re-anchor passes, and the standard steps
        # (lookup misses) whose forward pass the stats do not count (+-1: the first token)
        counters["steps"] = int(s["target_forward_passes"] + s["standard_fallback_steps"])
        return stamps, tokens, {**counters, "engine_stats": {k: s[k] for k in ORT_STATS}}

    result = _measure(timed, prompts, 1)
    return {**result, "version": og.__version__, "settings": spec if ngram else {}}


ORT_STATS = ["rounds", "draft_tokens_evaluated", "acceptance_rate", "standard_fallback_steps"]


def run_ov_genai(args, prompts: dict[str, list[int]]) -> dict:
    """LLMPipeline as in bench_decode.py (f32, 2 threads); -pa: plain decode on the paged
    (continuous batching) backend that prompt lookup runs on; -prompt-lookup: LLMPipeline(...,
    prompt_lookup=True) and GenerationConfig num_assistant_tokens=K, max_ngram_size=N."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    props = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    props |= {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    lookup = args.engine.endswith("-prompt-lookup")
    backend = "PA" if args.engine.endswith("-pa") else "SDPA"
    props |= {"prompt_lookup": True} if lookup else {"ATTENTION_BACKEND": backend}
    pipe = ov_genai.LLMPipeline(args.ref_model, "CPU", **props)
    k, n = args.num_draft or OV_K, args.ngram or OV_NGRAM

    def timed(ids):
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = NEW_TOKENS
        config.ignore_eos, config.do_sample = True, False
        if lookup:
            config.num_assistant_tokens, config.max_ngram_size = k, n
        x = np.array([ids], np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x)))
        stamps = ov_stamps(ov_genai)
        result = pipe.generate(inputs, config, stamps)
        # tokens per model step (the first: the prefill's)
        sizes = list(result.perf_metrics.raw_metrics.m_batch_sizes)
        counters = {"steps": len(sizes) - 1 if sum(sizes) == len(stamps.tokens) else None}
        if lookup and counters["steps"]:
            counters["accepted"] = sum(s - 1 for s in sizes[1:])
            counters["drafted"] = _ov_drafted(ids, stamps.tokens, sizes, k, n)
        return stamps.times, stamps.tokens, counters

    result = _measure(timed, prompts, 1)
    settings = {"num_assistant_tokens": k, "max_ngram_size": n} if lookup else {}
    return {**result, "version": ov_genai.__version__, "settings": settings}


def _ov_drafted(prompt: list[int], tokens: list[int], sizes: list[int], k: int, n: int):
    """The tokens OpenVINO GenAI's prompt lookup proposed (it does not say): its deterministic
    proposer (src/cpp/src/prompt_lookup/continuous_batching_for_prompt_lookup.cpp) replayed over
    the output; None where the replay disagrees with what it accepted."""
    drafted, done = 0, sizes[0]
    for size in sizes[1:]:
        seq = prompt + tokens[:done]
        budget, top = min(k, NEW_TOKENS - done - 1), n if n < len(seq) else len(seq) // 2
        found = []
        for m in range(top, 0, -1):  # the longest suffix n-gram first, its earliest match
            tail = seq[-m:]
            at = next((i for i in range(len(seq) - m) if seq[i : i + m] == tail), None)
            if at is not None:
                found = seq[at + m : at + m + budget]
                break
        if tokens[done : done + size - 1] != found[: size - 1]:
            return None
        drafted, done = drafted + len(found), done + size
    return drafted


def _child(engine: str, args, prompts: dict, python: str | None, extra: list[str]) -> dict:
    """One round of one engine in a fresh process; a failure is recorded, not fatal."""
    cmd = [python or sys.executable, __file__, "--engine", engine, "--ids", json.dumps(prompts)]
    cmd += ["--target", args.target, "--artifact", args.artifact, "--threads", str(args.threads)]
    cmd += [*extra, f"--num-draft={args.num_draft or 0}", f"--ngram={args.ngram or 0}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prompts(artifact: str) -> dict[str, list[int]]:
    """Every task's prompt ids, from the artifact's tokenizer (the same for every engine)."""
    from llmc.artifact import read_manifest
    from llmc.runtime.tokenizer import Tokenizer

    tok = Tokenizer(artifact, read_manifest(artifact, check_files=False)["generation"])
    return {task: tok.encode_chat([{"role": "user", "content": t}]) for task, t in TASKS.items()}


def _build_draft(args) -> None:
    """`llmc build --draft-layers N`: the target's first N layers and its head."""
    quant = [] if args.precision == "fp32" else ["--quant", args.precision]
    cmd = [sys.executable, "-m", "llmc.cli", "build", "-t", args.target, *quant]
    cmd += ["--draft-layers", str(args.draft_layers), "--out", args.draft_artifact]
    subprocess.run(cmd, check=True, capture_output=True)


def _summary(results: list[dict], plain: dict | None) -> dict:
    """One engine over its rounds: per task the median and per-round decode speed, acceptance,
    tokens per model step and how many leading greedy tokens agree with llmc plain."""
    tasks = {}
    for task, last in results[-1]["tasks"].items():
        runs = [x for r in results for x in r["tasks"][task]["decode_runs"]]
        drafted, accepted, steps = (last.get(k) for k in ("drafted", "accepted", "steps"))
        same = _same_prefix(last["tokens"], plain["tasks"][task]["tokens"]) if plain else None
        tasks[task] = {
            "decode_tok_s": round(statistics.median(runs), 1),
            "decode_runs": [round(x, 1) for x in runs],
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "steps": steps,
            "tokens_per_step": round(len(last["tokens"]) / steps, 2) if steps else None,
            "greedy_identical_prefix_vs_llmc": same,
            **({"engine_stats": last["engine_stats"]} if "engine_stats" in last else {}),
        }
    extra = {k: results[-1][k] for k in ("version", "settings") if k in results[-1]}
    return {**extra, "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results)), "tasks": tasks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["onnx", "openvino"], default="onnx")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--artifact", help="Default: artifacts/bench-smollm2-TARGET[-int8].")
    parser.add_argument("--draft-layers", type=int, default=6, help="Self-speculation's draft.")
    parser.add_argument("--draft-artifact", help="Default: the artifact's name + -draftN.")
    more = "every engine (default: each its own; README)"
    parser.add_argument("--num-draft", type=int, help=f"Most tokens drafted per step, {more}.")
    parser.add_argument("--ngram", type=int, help="The reference engines' n-gram size.")
    parser.add_argument("--engines", help="Comma-separated subset of the engines (default: all).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="Rounds (one process per engine).")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--ref-model", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = parser.parse_args()
    if args.artifact is None:
        suffix = "" if args.precision == "fp32" else f"-{args.precision}"
        args.artifact = str(ROOT / "artifacts" / f"bench-smollm2-{args.target}{suffix}")
    args.draft_artifact = args.draft_artifact or f"{args.artifact}-draft{args.draft_layers}"
    if args.engine:  # child process: one engine, one JSON line
        run = {"llmc": run_llmc, "onnx": run_ort_genai, "open": run_ov_genai}[args.engine[:4]]
        print(json.dumps(run(args, json.loads(args.ids))))
        return

    names = LLMC + REFERENCES[args.target]
    if args.engines and (unknown := set(args.engines.split(",")) - set(names)):
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {names}")
    names = [n for n in names if not args.engines or n in args.engines.split(",")]
    if "llmc-self-spec" in names and not (Path(args.draft_artifact) / "llmc.json").is_file():
        _build_draft(args)
    prompts = _prompts(args.artifact)
    ref_python, ref = None, []
    if any(not n.startswith("llmc") for n in names):
        env, model = (
            (reference_env, reference_model) if args.target == "onnx" else (ov_env, ov_model)
        )
        ref_python = env()
        ref = ["--ref-model", str(model(ref_python, args.precision))]
    extra = ["--draft-artifact", args.draft_artifact]
    # Rounds interleave the engines, so that a slow spell of this shared machine hits all alike.
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for _ in range(args.runs):
        for name in [n for n in names if n not in errors]:
            python, more = (None, extra) if name.startswith("llmc") else (str(ref_python), ref)
            result = _child(name, args, prompts, python, more)
            if "error" in result:
                errors[name] = result["error"]
            else:
                rounds[name].append(result)
    plain = rounds["llmc"][-1] if rounds.get("llmc") else None
    engines = {n: _summary(r, plain) for n, r in rounds.items() if r}
    report = {
        "protocol": {
            "model": f"SmolLM2-135M-Instruct {args.precision}",
            "target": args.target,
            "artifact": args.artifact,
            "tasks": {t: {"prompt_tokens": len(ids)} for t, ids in prompts.items()},
            "chat_greedy_new_tokens": NEW_TOKENS,
            "threads": args.threads,
            "num_draft": args.num_draft or "each engine's default (engines.*.settings)",
            "llmc_self_spec_draft": f"{args.draft_artifact} (--draft-layers {args.draft_layers})",
            "rounds": args.runs,
            "decode_tok_s": f"({NEW_TOKENS} - 1) / (last token's time - first token's time)",
            "tokens_per_step": "completion tokens / model forward passes after the prefill",
        },
        "engines": engines,
        "errors": errors,
        "ratios": _ratios(engines, REFERENCES[args.target]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def _ratios(engines: dict, refs: list[str]) -> dict:
    """Decode speed ratios (higher: the first is faster), per task: of the medians, and the
    median of per-round ratios (`paired`: both ran in the same round, so drift cancels)."""
    plain, lookup = refs[0], refs[-1]
    pairs = [("llmc-prompt-lookup", "llmc"), ("llmc-self-spec", "llmc"), ("llmc", plain)]
    pairs += [("llmc-prompt-lookup", lookup), (lookup, plain), (lookup, f"{plain}-pa")]
    out = {}
    for a, b in pairs:
        if a in engines and b in engines:
            ta, tb = engines[a]["tasks"], engines[b]["tasks"]
            out[f"{a} / {b}"] = {
                task: {
                    "median": round(ta[task]["decode_tok_s"] / tb[task]["decode_tok_s"], 3),
                    "paired": _paired(ta[task]["decode_runs"], tb[task]["decode_runs"]),
                }
                for task in ta
            }
    return out


def _paired(ours: list[float], theirs: list[float]) -> float:
    """The median of per-round ratios (an engine that failed in a later round has fewer)."""
    return round(statistics.median(a / b for a, b in zip(ours, theirs, strict=False)), 3)


if __name__ == "__main__":
    main()
