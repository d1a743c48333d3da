"""Artifacts that vendors' runtimes load as they are (`llmc build --compat RUNTIME`).

A compat artifact is an ordinary llmc artifact whose graph takes the vendor runtime's inputs
(the target's emitter rewrites them: targets/openvino/emit.py, targets/onnx/compat.py) with the
files that runtime reads beside it:
- openvino-genai (OpenVINO GenAI's LLMPipeline, and so OpenVINO Model Server): the tokenizer and
  detokenizer IRs of openvino-tokenizers and transformers' generation_config.json;
- onnxruntime-genai (og.Model): genai_config.json (tokenizer.json is already there).
The build then runs the vendor's runtime on the artifact, in a child process (a vendor crash
must not take the build with it), and compares its greedy tokens with PyTorch's; the manifest
records which runtimes the artifact was checked against (`runtimes`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import TargetError, VerificationError


class VendorRuntimeError(VerificationError):
    """The vendor's runtime cannot load or run a --compat artifact, or computes other tokens.
    Exit code 3."""


GREEDY_TOKENS = 32  # tokens per verification prompt the vendor runtime generates at build time
TIMEOUT_S = 600


@dataclass(frozen=True)
class Vendor:
    name: str
    target: str  # the llmc target whose artifacts it loads
    module: str  # what its runtime imports
    build_needs: tuple[str, ...] = ()  # modules the build needs to write its files


VENDORS = {
    v.name: v
    for v in (
        Vendor("openvino-genai", "openvino", "openvino_genai", ("openvino_tokenizers",)),
        Vendor("onnxruntime-genai", "onnx", "onnxruntime_genai"),
    )
}
INSTALL = "pip install 'llmc[vendors]'"


def check_option(compat: str | None, target: str) -> None:
    """TargetError unless `compat` (None: none) is a runtime of `target` whose build needs are
    installed (checked before any heavy work)."""
    if compat is None:
        return
    vendor = VENDORS.get(compat)
    if vendor is None:
        raise TargetError(f"--compat {compat}: choose one of {', '.join(VENDORS)}.")
    if vendor.target != target:
        ours = next(v.name for v in VENDORS.values() if v.target == target)
        raise TargetError(
            f"--compat {compat} is for --target {vendor.target}; with --target {target} use "
            f"--compat {ours}."
        )
    missing = [m for m in vendor.build_needs if importlib.util.find_spec(m) is None]
    if missing:
        raise TargetError(
            f"--compat {compat} needs {', '.join(missing)} to write the files its runtime "
            f"reads; install it with `{INSTALL}`."
        )


def version(vendor: Vendor) -> str | None:
    """The installed version of the vendor's runtime, None when it is not installed."""
    if importlib.util.find_spec(vendor.module) is None:
        return None
    try:
        return importlib.metadata.version(vendor.name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- the files each runtime reads beside the graph --------------------------------------------
def write_files(compat: str, directory: Path, manifest: dict, loaded) -> None:
    if compat == "openvino-genai":
        _openvino_genai_files(directory, loaded)
    else:
        config = genai_config(manifest, loaded.model.generation_config)
        (directory / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _openvino_genai_files(directory: Path, loaded) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    tokenizer, detokenizer = convert_tokenizer(loaded.tokenizer, with_detokenizer=True)
    ov.save_model(tokenizer, str(directory / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(directory / "openvino_detokenizer.xml"))
    if loaded.model.generation_config is not None:
        loaded.model.generation_config.save_pretrained(directory)


def genai_config(manifest: dict, generation_config) -> dict:
    """onnxruntime-genai's genai_config.json for the artifact's graph: its tensor names, cache
    geometry and shared past/present buffers, the tokens and the model's sampling defaults.
    The model type is its generic decoder: the graph carries everything model-specific."""
    model, gen, io = manifest["model"], manifest["generation"], manifest["io"]
    eos = gen["eos_token_ids"] or [gen["pad_token_id"]]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in io["inputs"]:
        inputs["position_ids"] = "position_ids"
    inputs |= {
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }

    def sampling(name: str, default):
        value = getattr(generation_config, name, None)
        return default if value is None else value

    return {
        "model": {
            "bos_token_id": gen["bos_token_id"] if gen["bos_token_id"] is not None else eos[0],
            "context_length": io["max_context"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest["target"]["files"]["model"],
                "head_size": model["head_dim"],
                "hidden_size": model["hidden_size"],
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": model["num_heads"],
                "num_hidden_layers": model["num_layers"],
                "num_key_value_heads": model["num_kv_heads"],
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": gen["pad_token_id"],
            "type": "decoder",
            "vocab_size": model["vocab_size"],
        },
        "search": {
            "do_sample": bool(sampling("do_sample", False)),
            "max_length": io["max_context"],
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": io["kv_mode"] == "shared",
            "repetition_penalty": float(sampling("repetition_penalty", 1.0)),
            "temperature": float(sampling("temperature", 1.0)),
            "top_k": int(sampling("top_k", 50)),
            "top_p": float(sampling("top_p", 1.0)),
        },
    }


# -- running the vendor's runtime ---------------------------------------------------------------
def vendor_greedy(compat: str, directory: Path, prompts: list[list[int]], texts: list[str],
                  steps: int) -> dict:  # fmt: skip
    """The vendor runtime's greedy tokens for each prompt (up to `steps`, fewer where it stops at
    an end-of-sequence token) and its tokenizer's encoding of `texts`, run in a child process:
    {"tokens": [[...]], "encoded": [[...]]}. A runtime that cannot load or run the artifact is a
    RuntimeError with the last line it wrote."""
    request = {
        "runtime": compat,
        "directory": str(directory),
        "prompts": prompts,
        "texts": texts,
        "steps": steps,
        "properties": properties(compat),
    }
    done = subprocess.run(
        [sys.executable, "-m", "llmc.compat"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def properties(compat: str) -> dict:
    """What the check passes the vendor runtime: OpenVINO computes at f32, as llmc's
    verification does (its plugin's default is bf16 on CPUs with AVX512-BF16 or AMX, and a model
    cannot ask for f32 itself)."""
    return {"INFERENCE_PRECISION_HINT": "f32"} if compat == "openvino-genai" else {}


def _run_openvino_genai(request: dict) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai

    # as a user would open it, at f32 (`properties`)
    pipe = openvino_genai.LLMPipeline(request["directory"], "CPU", **request["properties"])
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample = request["steps"], False
    config.repetition_penalty = 1.0
    tokens = []
    for prompt in request["prompts"]:
        ids = np.asarray([prompt], np.int64)
        inputs = openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        tokens.append([int(t) for t in pipe.generate(inputs, config).tokens[0]])
    tokenizer = pipe.get_tokenizer()
    encoded = [tokenizer.encode(t).input_ids.data[0].tolist() for t in request["texts"]]
    return {"tokens": tokens, "encoded": encoded}


def _run_onnxruntime_genai(request: dict) -> dict:
    import onnxruntime_genai as og

    model = og.Model(request["directory"])
    tokens = []
    for prompt in request["prompts"]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + request["steps"])
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        tokens.append(out)
    tokenizer = og.Tokenizer(model)
    encoded = [[int(t) for t in tokenizer.encode(text)] for text in request["texts"]]
    return {"tokens": tokens, "encoded": encoded}


def compare(expected: list[int], got: list[int], eos: set[int]) -> int | None:
    """The first position where the vendor's greedy tokens differ from PyTorch's (None: they
    agree). Both are cut at the first end-of-sequence token, where a runtime may stop."""

    def cut(tokens: list[int]) -> list[int]:
        ends = [i for i, t in enumerate(tokens) if t in eos]
        return tokens[: ends[0]] if ends else tokens

    a, b = cut(expected), cut(got)
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if same is None and len(a) != len(b):
        return min(len(a), len(b))
    return same


def check_artifact(compat: str, directory: Path, manifest: dict, loaded, graph=None) -> dict:
    """Run the vendor's runtime on the artifact: its greedy tokens after the verification prompts
    against PyTorch's (the model eager, or `graph`: a quantized build's, as verification
    compares), its tokenizer on their texts against transformers'. The manifest's record of it;
    {"checked": False, "reason": ...} where the runtime is not installed."""
    from llmc.compiler.verify import PROMPTS, greedy, verify_prompts

    vendor = VENDORS[compat]
    installed = version(vendor)
    if installed is None:
        return {"checked": False, "reason": f"{vendor.module} is not installed ({INSTALL})"}
    tokenizer, texts = loaded.tokenizer, list(PROMPTS)
    prompts = verify_prompts(tokenizer, int(manifest["io"]["max_context"]), GREEDY_TOKENS)
    expected = greedy(loaded.model, graph, prompts, GREEDY_TOKENS)
    try:
        got = vendor_greedy(compat, directory, prompts, texts, GREEDY_TOKENS)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise VendorRuntimeError(
            f"{compat} {installed} cannot run the artifact ({exc}); nothing was written. "
            "Re-run with --debug and report it."
        ) from None
    eos = set(manifest["generation"]["eos_token_ids"])
    differ = [compare(e, g, eos) for e, g in zip(expected, got["tokens"], strict=True)]
    return {
        "checked": True,
        "version": installed,
        "properties": properties(compat),
        "greedy_tokens": sum(map(len, expected)),
        "first_difference": differ,
        "identical": all(d is None for d in differ),
        "tokenizer_identical": got["encoded"] == [tokenizer.encode(t) for t in texts],
    }


def summary(compat: str, record: dict) -> str:
    """One line on a check_artifact record (build notes, llmc verify, llmc inspect)."""
    if not record["checked"]:
        return f"{compat}: not checked ({record['reason']})"
    tokens = f"{compat} {record['version']}: {record['greedy_tokens']} greedy tokens"
    if record["identical"]:
        line = f"{tokens} identical to PyTorch's"
    else:
        line = f"{tokens} differ from PyTorch's (first difference per prompt: "
        line += f"{record['first_difference']})"
    return line + ("" if record["tokenizer_identical"] else "; its tokenizer encodes differently")


def problems(record: dict, quantized: bool) -> list[str]:
    """What makes a checked record a failure: another tokenization, or other greedy tokens
    where the artifact is not quantized (a quantized one's fast kernels may differ)."""
    found = [] if record["tokenizer_identical"] else ["its tokenizer encodes differently"]
    if not record["identical"] and not quantized:
        found.append(f"its greedy tokens differ at {record['first_difference']}")
    return found


def main() -> None:
    """`python -m llmc.compat` (the child process of vendor_greedy): a JSON request on stdin,
    one JSON line of results on stdout."""
    request = json.loads(sys.stdin.read())
    run = {"openvino-genai": _run_openvino_genai, "onnxruntime-genai": _run_onnxruntime_genai}
    print(json.dumps(run[request["runtime"]](request)))


if __name__ == "__main__":
    main()
