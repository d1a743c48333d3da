"""`llmc build --dry-run`: the plan of a build (configuration, passes, architecture features,
memory, size and KV-cache estimates, whether the target runs here) in seconds, and the same
estimates checked against this machine before a real build starts (`check_resources`)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmc.config import BuildConfig
from llmc.errors import LlmcError

log = logging.getLogger(__name__)

GB = 1e9
SKIP_ENV = "LLMC_SKIP_RESOURCE_CHECK"  # "1": build without comparing estimates to free space

# Peak build memory = BASE_BYTES + PEAK_MULTIPLE[target] × the model's fp32 weights (the whole
# model is loaded before a draft is cut). Calibrated on SmolLM2-135M (0.54 GB of fp32 weights),
# builds with verification, peak RSS (`/usr/bin/time -v`, the manifests' peak_memory_gb): ONNX
# 1.81 GB fp32, 2.53 GB int4; OpenVINO 2.81 GB fp32; TVM 3.06 fp32, 2.76 int8, 2.52 int4;
# AOTInductor 4.29 fp32 (autotuned). A multiple is its target's largest measurement, rounded
# up; TensorRT's network is built and verified as ONNX's. Calibrated GPTQ/AWQ add their
# activation statistics (CALIBRATED_EXTRA).
BASE_BYTES = int(0.6 * GB)  # Python with torch, transformers and a back end (a tiny build: 0.5 GB)
PEAK_MULTIPLE = {"onnx": 3.6, "openvino": 4.2, "tvm": 4.6, "tensorrt": 3.6, "inductor": 7.0}
DEFAULT_PEAK_MULTIPLE = 7.0
CALIBRATED_EXTRA = 1.0
# Artifact weights: AOTInductor keeps the original parameters beside its packed copies.
SIZE_MULTIPLE = {"inductor": 2.0}
TOKENIZER_BYTES_PER_TOKEN = 72  # tokenizer.json (SmolLM2: 3.5 MB for 49k tokens)
FP32 = 4
SCALE_BYTES = 4  # quantization scales and zero points are fp32, one per group


@dataclass(frozen=True)
class Estimates:
    weights_fp32_bytes: int  # the loaded model
    artifact_bytes: int
    kv_bytes_per_1k_tokens: int  # fp32 K and V of every layer, one sequence
    kv_bytes_at_max_context: int
    max_context: int
    peak_memory_bytes: int


def estimate(facts, config: BuildConfig) -> Estimates:
    """Artifact size, KV cache and peak build memory of building `facts`' model with `config`."""
    spec = facts.spec
    layers = min(config.draft_layers or spec.num_layers, spec.num_layers)
    kv_per_1k = 2 * layers * spec.num_kv_heads * spec.head_dim * FP32 * 1024
    context = config.max_context or spec.max_context
    multiple = PEAK_MULTIPLE.get(config.target, DEFAULT_PEAK_MULTIPLE)
    quant = config.quant_config()
    if quant is not None and quant.calibrated:
        multiple += CALIBRATED_EXTRA
    fp32 = facts.params * FP32
    return Estimates(
        weights_fp32_bytes=fp32,
        artifact_bytes=artifact_bytes(facts, config, layers / spec.num_layers),
        kv_bytes_per_1k_tokens=kv_per_1k,
        kv_bytes_at_max_context=kv_per_1k * context // 1024,
        max_context=context,
        peak_memory_bytes=int(BASE_BYTES + multiple * fp32),
    )


def artifact_bytes(facts, config: BuildConfig, kept: float = 1.0) -> int:
    """Weights as the quantize_weights pass stores them: fp32; or the linears at --quant's bits,
    the lm_head and embedding tables at 8 bits (a tied lm_head with codes of its own), each
    with an fp32 scale per group and, asymmetric, an fp32 zero point; norms and biases fp32.
    `kept`: the fraction of decoder layers a draft keeps. 4-bit layers the pass moves to 8 bits
    for their error are not foreseen."""
    quant = config.quant_config()
    layer_params = facts.linear_params + facts.other_params  # scaled for a draft
    if quant is None:
        head = 0 if facts.tied else facts.head_params
        weights = (facts.embedding_params + head + layer_params * kept) * FP32
    else:
        group = quant.group or facts.spec.hidden_size

        def per_weight(bits: int, sym: bool) -> float:
            return bits / 8 + SCALE_BYTES / group * (1 if sym else 2)

        head_sym = quant.symmetric if quant.bits == 8 else True  # 8-bit fallbacks: symmetric
        weights = (
            facts.linear_params * kept * per_weight(quant.bits, quant.symmetric)
            + facts.head_params * per_weight(8, head_sym)
            + facts.embedding_params * per_weight(8, True)
            + facts.other_params * kept * FP32
        )
    weights *= SIZE_MULTIPLE.get(config.target, 1.0)
    return int(weights + facts.spec.vocab_size * TOKENIZER_BYTES_PER_TOKEN)


# -- this machine ---------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory a build can use: MemAvailable, or less under a cgroup limit (None: not
    Linux)."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and found is not None:
            found = min(found, int(limit) - used)
    except (OSError, ValueError):
        pass
    return found


def free_disk(path: Path) -> tuple[int, Path]:
    """Free bytes on the file system that will hold `path` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free, path


def shortfalls(estimates: Estimates, facts, out: Path) -> tuple[list[str], dict]:
    """What would not fit here: peak memory over available memory, the artifact (and a GGUF's
    first dequantized copy in the llmc cache) over free disk. Returns (problems, what was seen)."""
    from llmc.compiler.sources import cache_dir

    problems = []
    memory = available_memory()
    if memory is not None and estimates.peak_memory_bytes > memory:
        problems.append(
            f"the build needs about {estimates.peak_memory_bytes / GB:.1f} GB of memory at its "
            f"peak and {memory / GB:.1f} GB is available"
        )
    needs = [(Path(out).absolute().parent, estimates.artifact_bytes, "the artifact")]
    if facts.cached_gguf is False:
        needs.append((cache_dir(), estimates.weights_fp32_bytes, "the dequantized GGUF cache"))
    disks: dict[Path, list] = {}
    for path, size, what in needs:
        free, where = free_disk(path)
        device = os.stat(where).st_dev
        seen = disks.setdefault(device, [where, free, 0, []])
        seen[2] += size
        seen[3].append(what)
    for where, free, size, whats in disks.values():
        if size > free:
            problems.append(
                f"{' and '.join(whats)} would take about {size / GB:.2f} GB on {where}, which has "
                f"{free / GB:.2f} GB free"
            )
    first = next(iter(disks.values()))
    seen = {"available_memory_bytes": memory, "free_disk_bytes": first[1], "disk": str(first[0])}
    return problems, seen


def check_resources(config: BuildConfig, source, out: Path) -> Estimates | None:
    """Before a build's heavy work: refuse (LlmcError, exit 2) one whose estimated peak memory or
    artifact size exceeds what this machine has free. LLMC_SKIP_RESOURCE_CHECK=1 skips it; a
    model whose estimate cannot be made here is left to the build."""
    if os.environ.get(SKIP_ENV) == "1":
        return None
    from llmc.model_facts import model_facts

    try:
        facts = model_facts(source, kv_from_step=False)
        estimates = estimate(facts, config)
    except Exception as exc:  # the build reports its own errors, in its own words
        log.debug("no resource estimate for %s: %s", source.ref, exc)
        return None
    problems, _ = shortfalls(estimates, facts, out)
    if problems:
        raise LlmcError(
            f"{'; '.join(problems)} (estimates; `llmc build --dry-run` shows them). Free some, "
            f"or set {SKIP_ENV}=1 to build anyway."
        )
    return estimates


# -- the plan -------------------------------------------------------------------------------------


def target_status(info) -> tuple[str, bool]:
    """(what `llmc targets` says of it, whether it builds here)."""
    if not info.ready:
        return "planned, not implemented", False
    if info.missing():
        return f"not installed ({info.install})", False
    if info.missing(for_runtime=True):
        return f"builds here; its artifacts run where {info.runtime} is", True
    return "ready: builds and runs here", True


def plan(config: BuildConfig) -> dict:
    """Everything `llmc build` would do with `config`, without loading weights or writing."""
    from llmc import targets
    from llmc.build import output_path
    from llmc.compiler import sources
    from llmc.model_facts import model_facts

    started = time.perf_counter()
    info = targets.TARGETS.get(config.target) or targets.get(config.target)  # unknown: refused
    status, buildable = target_status(info)
    info.options(config)  # a flag the target does not take is refused, as in a build
    config.check()
    source = sources.resolve(config.model)
    out = output_path(config, source.name)
    facts = model_facts(source)
    pipeline = None
    if buildable:
        from llmc.compiler.pass_manager import select

        passes = info.pipeline(quant=config.quant_config())
        pipeline = [p.name for p in select(passes, config.passes, config.dump_after)]
    estimates = estimate(facts, config)
    problems, seen = shortfalls(estimates, facts, out)
    return {
        "config": config.describe(),
        "source": {
            "kind": source.kind,
            "ref": source.ref,
            "config_from": facts.config_from,
            **({"gguf_cached": facts.cached_gguf} if facts.cached_gguf is not None else {}),
        },
        "out": str(out),
        "out_exists": _out_state(out),
        "model": facts.spec.to_dict(),
        "features": list(facts.features),
        "parameters": {
            "total": facts.params,
            "linear": facts.linear_params,
            "lm_head": facts.head_params,
            "embedding": facts.embedding_params,
            "tied": facts.tied,
        },
        "target": {"name": info.name, "status": status, "buildable": buildable},
        "pipeline": pipeline,
        "estimates": asdict(estimates),
        "here": {**seen, "fits": not problems, "problems": problems},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _out_state(out: Path) -> str | None:
    from llmc.artifact import MANIFEST

    if not out.exists():
        return None
    if (out / MANIFEST).is_file():
        return "an llmc artifact: the build replaces it"
    if out.is_file() or any(out.iterdir()):
        return "exists and is not an llmc artifact: the build refuses it"
    return "an empty directory"


def render(p: dict) -> str:
    """The plan as the lines `llmc build --dry-run` prints."""
    m, e, here, params = p["model"], p["estimates"], p["here"], p["parameters"]
    source = p["source"]
    cached = {True: ", dequantized copy cached", False: ", not dequantized yet"}
    lines = [
        "config      " + "  ".join(f"{k}={v}" for k, v in p["config"].items()),
        f"source      {source['kind']} {source['ref']} (config from {source['config_from']}"
        f"{cached.get(source.get('gguf_cached'), '')})",
        f"out         {p['out']}" + (f" ({p['out_exists']})" if p["out_exists"] else ""),
        f"model       {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"vocab {m['vocab_size']}, context {m['max_context']}",
        f"parameters  {params['total'] / 1e6:.1f} M (linear {params['linear'] / 1e6:.1f} M, "
        f"lm_head {params['lm_head'] / 1e6:.1f} M{' tied' if params['tied'] else ''}, "
        f"embeddings {params['embedding'] / 1e6:.1f} M)",
        "features    " + "\n            ".join(p["features"]),
        f"target      {p['target']['name']}: {p['target']['status']}",
    ]
    if p["pipeline"] is not None:
        lines.append(f"passes      {len(p['pipeline'])}: " + ", ".join(p["pipeline"]))
    lines += [
        f"artifact    ~{_size(e['artifact_bytes'])} ({p['config'].get('quant', 'fp32')})",
        f"KV cache    {_size(e['kv_bytes_per_1k_tokens'])} per 1k tokens of context "
        f"({_size(e['kv_bytes_at_max_context'])} at {e['max_context']}, one sequence, fp32)",
        f"memory      ~{_size(e['peak_memory_bytes'])} peak during the build "
        f"(fp32 weights {_size(e['weights_fp32_bytes'])})",
    ]
    memory = here["available_memory_bytes"]
    lines.append(
        f"here        {_size(memory) if memory is not None else 'unknown'} memory available, "
        f"{_size(here['free_disk_bytes'])} free on {here['disk']}: "
        + ("fits" if here["fits"] else "DOES NOT FIT: " + "; ".join(here["problems"]))
    )
    lines.append(f"(dry run in {p['seconds']}s; nothing was loaded or written)")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"
