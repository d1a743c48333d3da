"""`llmc build`: source -> trace -> passes -> emit -> verify -> artifact (behind the CLI)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmc import __version__
from llmc.artifact import MANIFEST, atomic_directory, read_manifest, write_manifest
from llmc.config import DEFAULT_ARTIFACTS, BuildConfig
from llmc.errors import LlmcError, QualityGateError, VerificationError
from llmc.host import host_cpu

log = logging.getLogger(__name__)


class Progress:
    """Stage reporting; the CLI passes one that draws spinners, the API a silent one."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        log.info("%s done in %.1fs", name, time.perf_counter() - start)

    def note(self, text: str) -> None:
        log.info(text)


@dataclass
class BuildResult:
    path: Path
    manifest: dict


def output_path(config: BuildConfig, source_name: str) -> Path:
    return config.out or DEFAULT_ARTIFACTS / f"{source_name}-{config.target}"


def _check_destination(path: Path) -> None:
    if path.exists() and not (path / MANIFEST).is_file():
        if path.is_file() or any(path.iterdir()):
            raise LlmcError(
                f"{path} exists and is not an llmc artifact; choose another --out or remove it."
            )


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    from llmc import targets
    from llmc.compiler import sources

    progress = progress or Progress()
    target = targets.get(config.target)  # fails fast, before any heavy work
    source = sources.resolve(config.model)
    out = output_path(config, source.name)
    _check_destination(out)
    if config.max_ppl_increase is not None and config.eval_file is None:
        raise LlmcError("--max-ppl-increase needs --eval FILE, the text to measure it on.")
    if config.eval_file is not None and not Path(config.eval_file).is_file():
        raise LlmcError(f"--eval {config.eval_file} is not a file; pass a UTF-8 text file.")
    if config.precision and config.target != "openvino":
        raise LlmcError(f"--precision applies to --target openvino, not {config.target}.")
    quant = _quant_config(config)
    passes = target.pipeline(quant=quant)
    from llmc.compiler.pass_manager import select

    passes = select(passes, config.passes)
    started = time.perf_counter()

    with progress.stage(f"load {source.kind} model {source.ref}"):
        loaded = sources.load(source)
    from llmc.compiler.diagnose import emitting, tracing
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import run_pipeline, trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import trace

    spec = ModelSpec.from_model(loaded.model)
    if config.max_context:
        if config.max_context > spec.max_context:
            raise LlmcError(
                f"--max-context {config.max_context} exceeds the model's {spec.max_context}; "
                "pass a smaller value."
            )
        spec = dataclasses.replace(spec, max_context=config.max_context)
    options = trace_options(passes, loaded.model)
    with progress.stage("trace with torch.export"), tracing(loaded.model, spec.architecture):
        traced = trace(loaded.model, spec, options=options)
    graph = Graph.from_trace(traced, spec, options)
    calibration = None
    if quant is not None and quant.calibrated:
        calibration = _calibration(config, loaded.tokenizer, spec.max_context)
        next(p for p in passes if p.name == "quantize_weights").calibration = calibration["rows"]
    with progress.stage(f"run {len(passes)} passes"):
        reports = run_pipeline(graph, passes)

    with atomic_directory(out) as tmp:
        with progress.stage(f"emit {config.target}"), emitting(config.target, spec.architecture):
            emitted = target.emit(graph, tmp)
        loaded.tokenizer.save_pretrained(tmp)
        manifest = _manifest(config, source, spec, graph, emitted, reports, loaded)
        if config.precision:
            manifest["target"]["precision"] = config.precision  # verification still runs at f32
        if graph.quantization is not None:
            manifest["quantization"] = {
                **graph.quantization,
                "calibration": {k: v for k, v in calibration.items() if k != "rows"}
                if calibration
                else None,
            }
        files = write_manifest(tmp, manifest)  # the session reads it during verification
        if config.verify:
            what = "the quantized graph in PyTorch" if quant else "PyTorch eager"
            with progress.stage(f"verify against {what}"):
                result, fast = _verify(
                    config, source, loaded, target, tmp, graph if quant else None
                )
            manifest["verification"] = result.to_dict()
            if fast is not None:
                manifest["verification"]["fast_kernels"] = fast
                progress.note(
                    f"fast kernels ({fast['kernels']}): max |Δlogits| {fast['max_abs_diff']:.2e}, "
                    f"greedy {fast['greedy_agreement']}/{fast['steps_compared']}"
                )
            progress.note(f"verification: {result.summary()}")
            if not result.passed:
                raise VerificationError(
                    f"the {config.target} artifact does not match PyTorch ({result.summary()}); "
                    "nothing was written. Re-run with --debug and report it."
                )
        if config.eval_file is not None:
            with progress.stage(f"perplexity on {Path(config.eval_file).name}"):
                evaluation = _evaluate(config, loaded, target, tmp)
            manifest["evaluation"] = evaluation
            progress.note(_describe_evaluation(evaluation))
            _quality_gate(config, evaluation)
        manifest["build"]["seconds"] = round(time.perf_counter() - started, 1)
        write_manifest(tmp, manifest, files)  # verification changed no file: reuse the hashes
    return BuildResult(out, read_manifest(out, check_files=False))


def default_tolerance(source_kind: str) -> float:
    """DESIGN.md's bars: 1e-4 on tiny random models, 1e-3 on real ones."""
    return 1e-4 if source_kind == "tiny" else 1e-3


def _verify(config, source, loaded, target, directory: Path, graph=None):
    """Parity with PyTorch eager; a quantized artifact is compared with its own graph run in
    PyTorch (the same dequantized weights), so the check is of the lowering, and perplexity
    (`--eval`) measures the quantization."""
    from llmc.compiler.verify import EagerReference, GraphReference, verify

    manifest = read_manifest(directory, check_files=False)
    tolerance = config.tolerance or default_tolerance(source.kind)
    steps = config.decode_steps
    if graph is None:  # exact: at f32 even when the artifact asks for bf16 at run time
        session = target.session_class()(directory, manifest, exact=True)
        prompts = verify_prompts(loaded.tokenizer, session.max_context)
        return verify(EagerReference(loaded.model), session, prompts, tolerance, steps), None
    # Quantized: the exact kernels must compute what the graph computes; the fast decode kernels
    # (int8 activations) are compared too, for the record.
    exact = target.session_class()(directory, manifest, exact=True)
    prompts = verify_prompts(loaded.tokenizer, exact.max_context)
    capacity = max(2, max(len(p) for p in prompts) + steps + 1)
    result = verify(GraphReference(graph, capacity), exact, prompts, tolerance, steps)
    del exact
    fast = target.session_class()(directory, manifest)
    if not fast.fast_kernels:  # the default session is the exact one
        return result, None
    decode = verify(GraphReference(graph, capacity), fast, prompts, tolerance, steps)
    return result, {
        "kernels": fast.fast_kernels,
        "max_abs_diff": decode.max_abs_diff,
        "greedy_agreement": decode.greedy_agreement,
        "steps_compared": decode.steps_compared,
    }


def _quant_config(config):
    """The QuantConfig of --quant/--group-size/--sym, with flag errors found before any work."""
    if config.quant is None:
        if config.sym is not None or config.calib is not None:
            raise LlmcError("--sym/--asym and --calib only apply with --quant; add --quant int4.")
        return None
    from llmc.passes.quantize_weights import METHODS, QuantConfig

    if config.quant not in METHODS:
        raise LlmcError(f"--quant {config.quant}: choose one of {', '.join(METHODS)}.")
    g = config.group_size
    if g and (g & (g - 1) or not 16 <= g <= 256):
        raise LlmcError(
            f"--group-size {g}: use a power of two from 16 to 256, or 0 for one group per row."
        )
    if config.calib is not None and not Path(config.calib).is_file():
        raise LlmcError(f"--calib {config.calib} is not a file; pass a UTF-8 text file.")
    return QuantConfig(config.quant, group=g, sym=config.sym)


DEFAULT_CALIB = Path("../shared/data/tinyshakespeare-dev.txt")


def _calibration(config, tokenizer, max_context: int) -> dict:
    """Calibration rows: `calib_samples` windows of `calib_seqlen` tokens, spread evenly over
    the text; with the file's hash for the manifest."""
    import torch

    from llmc.artifact import sha256_file

    path = Path(config.calib) if config.calib else DEFAULT_CALIB
    if not path.is_file():
        raise LlmcError(
            f"--quant {config.quant} needs calibration text: pass --calib FILE (any UTF-8 text)."
        )
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"), verbose=False)["input_ids"])
    seqlen = min(config.calib_seqlen, max_context, len(ids))
    if seqlen < 8:
        raise LlmcError(f"--calib {path} is too short; pass a text of a few hundred words.")
    count = min(config.calib_samples, len(ids) // seqlen)
    starts = torch.linspace(0, len(ids) - seqlen, count).long().tolist()
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "samples": count,
        "seqlen": seqlen,
        "rows": [ids[s : s + seqlen] for s in starts],
    }


def _evaluate(config, loaded, target, directory: Path) -> dict:
    """The artifact's perplexity (its default session: what users run, and what the gate judges)
    and the fp32 PyTorch model's, on the same windows; where the default session scores text on
    fast kernels, the exact kernels' perplexity too."""
    from llmc.evaluate import TorchScorer, evaluate_session

    manifest = read_manifest(directory, check_files=False)
    session = target.session_class()(directory, manifest)
    tok = loaded.tokenizer

    def encode(text: str) -> list[int]:
        return tok(text, verbose=False)["input_ids"]

    def measure(session, reference=None) -> dict:
        tokens = config.eval_tokens
        return evaluate_session(
            session, encode, config.eval_file, max_tokens=tokens, reference=reference
        )

    ours = measure(session, TorchScorer(loaded.model))
    reference = ours.pop("reference_perplexity")
    entry = {
        **ours,
        "reference": {"engine": "pytorch-fp32", "perplexity": reference},
        "increase": ours["perplexity"] / reference - 1,
        "max_increase": config.max_ppl_increase,
    }
    if getattr(session, "fast_prompts", False):
        del session
        exact = measure(target.session_class()(directory, manifest, exact=True))["perplexity"]
        entry["exact"] = {"perplexity": exact, "increase": exact / reference - 1}
    return entry


def _describe_evaluation(e: dict) -> str:
    exact = f"; exact kernels {e['exact']['increase']:+.2%}" if "exact" in e else ""
    return (
        f"perplexity {e['perplexity']:.3f} on {e['tokens']} tokens of {e['file']} "
        f"(fp32 PyTorch {e['reference']['perplexity']:.3f}, {e['increase']:+.2%}{exact})"
    )


def _quality_gate(config, evaluation: dict) -> None:
    limit = config.max_ppl_increase
    if limit is not None and evaluation["increase"] > limit:
        raise QualityGateError(
            f"{_describe_evaluation(evaluation)} exceeds --max-ppl-increase {limit:.1%}; "
            "nothing was written. Try a gentler --quant, a smaller --group-size, or gptq/awq."
        )


def verify_prompts(tokenizer, max_context: int, decode_steps: int = 8) -> list[list[int]]:
    """The fixed verification prompts, cut so that prompt and decode steps fit the context."""
    from llmc.compiler.verify import PROMPTS

    keep = max(1, max_context - decode_steps)
    return [tokenizer(text)["input_ids"][:keep] for text in PROMPTS]


def _manifest(config, source, spec, graph, emitted, reports, loaded) -> dict:
    import torch
    import transformers

    tok = loaded.tokenizer
    gen_config = getattr(loaded.model, "generation_config", None)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(gen_config, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    pad = (
        tok.pad_token_id
        if tok.pad_token_id is not None
        else getattr(gen_config, "pad_token_id", None)
    )
    past = [n for n in graph.input_names if n.startswith("past_key_values.")]
    present = [n for n in graph.output_names if n.startswith("present.")]
    return {
        "llmc_version": __version__,
        "toolchain": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **emitted.toolchain,
        },
        "source": source.to_dict(),
        "model": spec.to_dict(),
        "target": {
            "name": config.target,
            "flavor": emitted.flavor,
            "files": {"model": emitted.files[0]},
            **(emitted.target or {}),
        },
        "io": {
            "inputs": emitted.inputs or graph.input_names,
            "outputs": graph.output_names,
            "past_inputs": past,
            "present_outputs": present,
            "dtypes": {
                "input_ids": "int64",
                "position_ids": "int64",
                "attention_mask": "int64",
                "logits": "float32",
            },
            "kv_dtype": "float32",
            "kv_layout": "[batch, kv_heads, seq, head_dim]",
            "kv_mode": graph.kv_mode,
            "logits": graph.logits,
            "max_context": spec.max_context,
            **(emitted.io or {}),
        },
        "quantization": None,
        "passes": [r.to_dict() for r in reports],
        "graph": {
            "nodes": sum(emitted.op_histogram.values()),
            "op_histogram": emitted.op_histogram,
        },
        "verification": {"skipped": True},
        "generation": {
            "eos_token_ids": sorted(eos),
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": pad if pad is not None else (min(eos) if eos else 0),
            "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
            "special_tokens": {
                k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)
            },
        },
        "build": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": None,
            "host": host_cpu(),  # the kernels verification ran on depend on it
        },
    }
