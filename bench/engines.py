"""How each engine of the decode protocol (bench/README.md) generates and is timed: llmc's runtime,
transformers eager, onnxruntime-genai's og.Generator and OpenVINO GenAI's LLMPipeline, each giving
decode tokens/s over exactly NEW_TOKENS greedy tokens and the time to the first token of a
TTFT_TOKENS-token prompt. The benches (bench_decode.py, bench_compat.py, bench_speculative.py) run
these in child processes and compare them."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from reference_envs import ov_stamps

PROMPT = "Write a long story about a lighthouse keeper."
NEW_TOKENS = 128
TTFT_TOKENS = 512
ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare-dev.txt"


def _peak_rss_mb() -> float:
    from llmc.host import peak_rss_mb  # this process's own, not its spawner's (host.py)

    return peak_rss_mb()


def _long_prompt(encode) -> list[int]:
    text = TEXT.read_text() if TEXT.is_file() else "All the world's a stage. " * 400
    return encode(text[:20000])[:TTFT_TOKENS]


def run_llmc(artifact: str, threads: int, runs: int, hint: str | None, exact: bool) -> dict:
    import llmc.runtime as rt

    options = {"precision": hint} if hint else {}  # OpenVINO: the compute precision
    gen = rt.load(artifact, threads=threads, exact=exact, **options)
    ids = gen.encode(PROMPT, chat=True)
    long_ids = _long_prompt(lambda t: gen.tokenizer.encode(t, add_special_tokens=False))

    def timed(prompt_ids, n):
        stamps, tokens = [], []
        start = time.perf_counter()
        for step in gen.generate_ids([prompt_ids], rt.GenerationConfig(n, ignore_eos=True)):
            stamps.append(time.perf_counter())
            tokens.append(int(step[0]))
        return start, stamps, tokens

    precision = getattr(gen.model, "precision", "f32")  # OpenVINO's compute precision
    kernels = gen.model.fast_kernels or ("exact" if precision == "f32" else precision)
    return {**_measure(timed, ids, long_ids, runs), "kernels": kernels}


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


def _prompts(artifact: str) -> tuple[list[int], list[int]]:
    """The same prompt token ids for every engine (the artifact's tokenizer only, no session)."""
    from llmc.artifact import read_manifest
    from llmc.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(artifact, read_manifest(artifact, check_files=False)["generation"])
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    return ids, _long_prompt(lambda t: tokenizer.encode(t, add_special_tokens=False))


def run_ort_genai(model_dir: str, artifact: str, threads: int, runs: int) -> dict:
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    ids, long_ids = _prompts(artifact)

    def timed(prompt_ids, n):
        params = og.GeneratorParams(model)
        total = len(prompt_ids) + n  # its shared KV buffer is sized to max_length
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        stamps, tokens = [], []
        start = time.perf_counter()
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            tokens.append(int(generator.get_next_tokens()[0]))
        return start, stamps, tokens

    result = _measure(timed, ids, long_ids, runs)
    result["version"] = og.__version__
    return result


def run_ov_genai(model_dir: str, artifact: str, threads: int, runs: int, hint: str, exact: bool):
    """openvino_genai.LLMPipeline, stateful SDPA backend, prefix caching off, at the compute
    precision `hint` (f32: f32 inference and KV cache, llmc's default; bf16: OpenVINO's own
    default here), with the plugin's dynamic quantization unless `exact` turns it off."""
    import openvino as ov
    import openvino_genai as ov_genai

    props = {"ATTENTION_BACKEND": "SDPA", "INFERENCE_NUM_THREADS": threads}
    props |= {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if hint == "f32":
        props |= {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    group = 0 if exact else ov.Core().get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE")
    props |= {"DYNAMIC_QUANTIZATION_GROUP_SIZE": group} if exact else {}
    kernels = f"plugin default: dynamic quantization, groups of {group}" if group else "exact"
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", **props)
    ids, long_ids = _prompts(artifact)
    result = _measure(ov_timed(pipe), ids, long_ids, runs)
    return {**result, "version": ov_genai.__version__, "kernels": kernels}


def ov_timed(pipe):
    """`timed(prompt_ids, n)` (as `_measure` takes it) for an OpenVINO GenAI LLMPipeline:
    exactly n greedy tokens, each one's arrival time."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    def timed(prompt_ids, n):
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = n
        config.ignore_eos, config.do_sample = True, False
        tensor = ov.Tensor(np.array([prompt_ids], np.int64))
        mask = ov.Tensor(np.ones((1, len(prompt_ids)), np.int64))
        stamps = ov_stamps(ov_genai)
        start = time.perf_counter()
        pipe.generate(ov_genai.TokenizedInputs(tensor, mask), config, stamps)
        return start, stamps.times, stamps.tokens

    return timed
