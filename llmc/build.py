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
from llmc.errors import LlmcError, VerificationError

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
    passes = target.pipeline()
    from llmc.compiler.pass_manager import select

    passes = select(passes, config.passes)
    started = time.perf_counter()

    with progress.stage(f"load {source.kind} model {source.ref}"):
        loaded = sources.load(source)
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import run_pipeline, trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import trace

    spec = ModelSpec.from_config(loaded.model.config)
    if config.max_context:
        if config.max_context > spec.max_context:
            raise LlmcError(
                f"--max-context {config.max_context} exceeds the model's {spec.max_context}; "
                "pass a smaller value."
            )
        spec = dataclasses.replace(spec, max_context=config.max_context)
    options = trace_options(passes, loaded.model)
    with progress.stage("trace with torch.export"):
        traced = trace(loaded.model, spec, options=options)
    graph = Graph.from_trace(traced, spec, options)
    with progress.stage(f"run {len(passes)} passes"):
        reports = run_pipeline(graph, passes)

    with atomic_directory(out) as tmp:
        with progress.stage(f"emit {config.target}"):
            emitted = target.emit(graph, tmp)
        loaded.tokenizer.save_pretrained(tmp)
        manifest = _manifest(config, source, spec, graph, emitted, reports, loaded)
        files = write_manifest(tmp, manifest)  # the session reads it during verification
        if config.verify:
            with progress.stage("verify against PyTorch eager"):
                result = _verify(config, source, loaded, target, tmp)
            manifest["verification"] = result.to_dict()
            progress.note(f"verification: {result.summary()}")
            if not result.passed:
                raise VerificationError(
                    f"the {config.target} artifact does not match PyTorch ({result.summary()}); "
                    "nothing was written. Re-run with --debug and report it."
                )
        manifest["build"]["seconds"] = round(time.perf_counter() - started, 1)
        write_manifest(tmp, manifest, files)  # verification changed no file: reuse the hashes
    return BuildResult(out, read_manifest(out, check_files=False))


def default_tolerance(source_kind: str) -> float:
    """DESIGN.md's bars: 1e-4 on tiny random models, 1e-3 on real ones."""
    return 1e-4 if source_kind == "tiny" else 1e-3


def _verify(config, source, loaded, target, directory: Path):
    from llmc.compiler.verify import verify

    session = target.session_class()(directory, read_manifest(directory, check_files=False))
    tolerance = config.tolerance or default_tolerance(source.kind)
    return verify(
        loaded.model,
        session,
        verify_prompts(loaded.tokenizer, session.max_context),
        tolerance,
        decode_steps=config.decode_steps,
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
        "build": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": None},
    }
