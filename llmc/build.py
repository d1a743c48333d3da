"""`llmc build`: source -> trace -> passes -> emit -> verify -> artifact (behind the CLI)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmc.artifact import MANIFEST, atomic_directory, read_manifest, write_manifest
from llmc.config import DEFAULT_ARTIFACTS, BuildConfig
from llmc.errors import LlmcError, VerificationError
from llmc.manifest import assemble

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


def peak_memory_gb() -> float:
    """The peak resident memory of this process so far (a build's, run from the CLI)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


@dataclass
class BuildResult:
    path: Path
    manifest: dict


def output_path(config: BuildConfig, source_name: str) -> Path:
    draft = f"-draft{config.draft_layers}" if config.draft_layers else ""
    return config.out or DEFAULT_ARTIFACTS / f"{source_name}-{config.target}{draft}"


def _check_destination(path: Path) -> None:
    if path.exists() and not (path / MANIFEST).is_file():
        if path.is_file() or any(path.iterdir()):
            raise LlmcError(
                f"{path} exists and is not an llmc artifact; choose another --out or remove it."
            )


def build(config: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """The stages, in order; every flag error is found before the first heavy one."""
    from llmc import targets
    from llmc.compiler import sources
    from llmc.compiler.diagnose import emitting
    from llmc.compiler.pass_manager import PassContext, select

    progress = progress or Progress()
    target = targets.get(config.target)
    options = target.options(config)
    config.check()
    source = sources.resolve(config.model)
    out = output_path(config, source.name)
    _check_destination(out)
    quant = config.quant_config()
    passes = select(target.pipeline(quant=quant), config.passes, config.dump_after)
    ctx = PassContext(dump_dir=config.dump_dir, dump_after=config.dump_after)
    started = time.perf_counter()

    with progress.stage(f"load {source.kind} model {source.ref}"):
        loaded = sources.load(source)
    draft = None
    if config.draft_layers:
        from llmc.compiler.draft import keep_first_layers

        draft = keep_first_layers(loaded.model, config.draft_layers)
        progress.note(f"draft: the first {draft['layers']} of {draft['of']} layers")
    graph = _trace(config, loaded, passes, ctx, progress)
    calibration = None
    if quant is not None and quant.calibrated:
        from llmc.compiler.calibration import calibration as calibrate

        calibration = calibrate(
            config.calib, loaded.tokenizer, config.calib_samples, config.calib_seqlen,
            graph.spec.max_context,
        )  # fmt: skip
        ctx.calibration = calibration.rows
    with progress.stage(f"run {len(passes)} passes"):
        from llmc.compiler.pass_manager import run_pipeline

        reports = run_pipeline(graph, passes, ctx)
    for path in ctx.dumped:
        progress.note(f"graph dumped to {path}")

    with atomic_directory(out) as tmp:
        with (
            progress.stage(f"emit {config.target}"),
            emitting(config.target, graph.spec.architecture),
        ):
            emitted = target.emit(graph, tmp, options)
        for note in emitted.notes:
            progress.note(note)
        loaded.tokenizer.save_pretrained(tmp)
        manifest = assemble(config, source, graph, emitted, reports, loaded, calibration)
        if draft:
            manifest["source"]["draft"] = draft
        files = write_manifest(tmp, manifest)  # the session reads it during verification
        if config.verify:
            manifest["verification"] = _verify(config, source, loaded, target, tmp, graph, progress)
        if config.eval_file is not None:
            from llmc.evaluate import describe, evaluate_build, quality_gate

            with progress.stage(f"perplexity on {Path(config.eval_file).name}"):
                evaluation = evaluate_build(
                    target.model_class(verify=True),
                    tmp,
                    manifest,
                    config,
                    loaded.model,
                    loaded.tokenizer,
                )
            manifest["evaluation"] = evaluation
            progress.note(describe(evaluation))
            quality_gate(evaluation)
        manifest["build"]["seconds"] = round(time.perf_counter() - started, 1)
        manifest["build"]["peak_memory_gb"] = round(peak_memory_gb(), 2)
        write_manifest(tmp, manifest, files)  # verification changed no file: reuse the hashes
    return BuildResult(out, read_manifest(out, check_files=False))


def _trace(config: BuildConfig, loaded, passes, ctx, progress):
    """The model spec (with --max-context), the trace-time passes' requests, torch.export."""
    from llmc.compiler.diagnose import tracing
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import trace

    with tracing(loaded.model, loaded.model.config.model_type):  # one eager step runs here too
        spec = ModelSpec.from_model(loaded.model)
    if config.max_context:
        if config.max_context > spec.max_context:
            raise LlmcError(
                f"--max-context {config.max_context} exceeds the model's {spec.max_context}; "
                "pass a smaller value."
            )
        spec = dataclasses.replace(spec, max_context=config.max_context)
    options = trace_options(passes, loaded.model, ctx)
    with progress.stage("trace with torch.export"), tracing(loaded.model, spec.architecture):
        traced = trace(loaded.model, spec, options=options)
    return Graph.from_trace(traced, spec)


def _verify(config, source, loaded, target, directory: Path, graph, progress) -> dict:
    """compiler.verify.verify_artifact with the build's tolerance, shown as it goes; a mismatch
    is a VerificationError (exit 3)."""
    from llmc.compiler.verify import default_tolerance, verify_artifact

    quantized = graph.quantization is not None
    what = "the quantized graph in PyTorch" if quantized else "PyTorch eager"
    with progress.stage(f"verify against {what}"):
        found = verify_artifact(
            target.model_class(verify=True),
            directory,
            read_manifest(directory, check_files=False),
            loaded.model,
            loaded.tokenizer,
            config.tolerance or default_tolerance(source.kind),
            config.decode_steps,
            graph if quantized else None,
        )
    if found.fast is not None:
        fast = found.fast
        progress.note(
            f"fast kernels ({fast['kernels']}): max |Δlogits| {fast['max_abs_diff']:.2e}, "
            f"greedy {fast['greedy_agreement']}/{fast['steps_compared']}"
        )
    result = found.exact
    progress.note(f"verification: {result.summary()}")
    if not result.passed:
        raise VerificationError(
            f"the {config.target} artifact does not match PyTorch ({result.summary()}); "
            "nothing was written. Re-run with --debug and report it."
        )
    return found.to_dict()
