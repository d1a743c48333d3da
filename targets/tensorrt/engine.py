"""The TensorRT build spec (build_spec.json) of a network, and the engine build where TensorRT
and a CUDA device exist.

The spec is what a user on a machine with TensorRT needs to build the engine by hand: two
optimization profiles (0: prompts, up to the whole context in one step; 1: decode and short
verification steps), every input's min/opt/max shape in each, the precision, the workspace, and
the equivalent `trtexec` command. The engine build does the same through TensorRT's Python API
(builder -> ONNX parser -> profiles -> serialized engine), keeping a timing cache beside the
engine so that a rebuild picks the same kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmc.contract import IOContract

SPEC_FILE = "build_spec.json"
ENGINE_FILE = "model.engine"
TIMING_CACHE = "timing.cache"
MAX_BATCH = 8
DECODE_STEP = 16  # a decode profile's step: one token, or a verification of up to 16 drafted
WORKSPACE_MB = 4096
NEEDS = (
    "building the engine needs TensorRT >= {version} (`pip install tensorrt` from NVIDIA's index) "
    "and an NVIDIA GPU; on such a machine run `llmc build ... --target tensorrt` again, or the "
    "`trtexec` command in {spec}."
)


def _profile(io: IOContract, inputs: list[str], seq: tuple, past: tuple, batch: tuple) -> dict:
    """min/opt/max shape of every network input, from (min, opt, max) of sequence, past
    length and batch."""
    geometry = io.cache
    shapes = {}
    for name in inputs:
        if name in ("input_ids", "position_ids") or (io.recurrent and name == "attention_mask"):
            dims = [batch, seq]
        elif io.recurrent and name in io.past_inputs:  # a state: the same size at any length
            _, channels, width = geometry.shapes(1)[io.past_inputs.index(name)]
            dims = [batch, (channels,) * 3, (width,) * 3]
        elif name == "attention_mask":  # past + new positions, never more than the context
            total = tuple(s + p for s, p in zip(seq, past, strict=True))
            dims = [batch, (*total[:2], min(total[2], geometry.max_context))]
        elif name == "logits_index":
            dims = [(1, 1, seq[2])]
        elif name in io.past_inputs:
            dims = [batch, (geometry.kv_heads,) * 3, past, (geometry.head_dim,) * 3]
        else:
            raise ValueError(f"no profile rule for input {name}")
        shapes[name] = {
            k: [d if isinstance(d, int) else d[i] for d in dims]
            for i, k in enumerate(("min", "opt", "max"))
        }
    return shapes


def build_spec(io: IOContract, inputs: list[str], precision: str, version: str) -> dict:
    # a recurrent network takes prompts in steps of step_tokens, whatever the context
    context = io.cache.step_tokens if io.recurrent else io.max_context
    prompt = _profile(io, inputs, (1, min(512, context), context), (0, 0, context - 1),
                      (1, 1, MAX_BATCH))  # fmt: skip
    step = min(DECODE_STEP, context)
    decode = _profile(io, inputs, (1, 1, step), (0, min(512, context - step), context - 1),
                      (1, 1, MAX_BATCH))  # fmt: skip
    spec = {
        "tensorrt": f">={version}",
        "network": "model.onnx",
        "strongly_typed": True,
        "precision": precision,
        "workspace_mb": WORKSPACE_MB,
        "max_context": io.max_context,
        "profiles": [
            {"name": "prefill", "shapes": prompt},
            {"name": "decode", "shapes": decode},
        ],
        "engine": ENGINE_FILE,
        "timing_cache": TIMING_CACHE,
    }
    spec["trtexec"] = trtexec_command(spec)
    return spec


def trtexec_command(spec: dict) -> str:
    def shapes(profile, key):
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in profile["shapes"].items()
        )

    parts = [
        "trtexec",
        f"--onnx={spec['network']}",
        "--stronglyTyped",
        f"--memPoolSize=workspace:{spec['workspace_mb']}M",
        f"--timingCacheFile={spec['timing_cache']}",
        f"--saveEngine={spec['engine']}",
    ]
    for i, profile in enumerate(spec["profiles"]):
        parts.append(f"--profile={i}")
        for key in ("min", "opt", "max"):
            parts.append(f"--{key}Shapes={shapes(profile, key)}")
    return " ".join(parts)


def write_spec(directory: Path, spec: dict) -> None:
    (Path(directory) / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def available() -> str | None:
    """None when an engine can be built here, else why not (one sentence's subject)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    except ImportError:  # pragma: no cover - the compiler always has torch
        return "torch is not installed"
    return None


def build_engine(directory: Path, spec: dict) -> dict:  # pragma: no cover - needs TensorRT
    """Build and save the engine of `spec` in `directory`; return what the manifest records.
    Runs only where `available()` is None (no TensorRT exists on this project's machines)."""
    import tensorrt as trt

    directory = Path(directory)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(directory / spec["network"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser refused the network: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec["workspace_mb"] << 20)
    cache_path = directory / spec["timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for entry in spec["profiles"]:
        profile = builder.create_optimization_profile()
        for name, s in entry["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above).")
    (directory / spec["engine"]).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"engine": spec["engine"], "tensorrt": trt.__version__}
