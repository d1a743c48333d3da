"""`llmc build`: source -> trace -> passes -> emit -> verify -> artifact (behind the CLI)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmc.artifact import MANIFEST, atomic_directory, read_manifest, write_manifest
from llmc.config import DEFAULT_ARTIFACTS, BuildConfig
from llmc.errors import LlmcError, VerificationError
from llmc.manifest import assemble, utc_now

log = logging.getLogger(__name__)


class Progress:
    """Stage reporting; the CLI passes one that draws spinners, the API a silent one. Both keep
    every stage's seconds (`timings`, for `llmc build --json` and the manifest)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        log.info("%s done in %.1fs", name, self.timings[name])

    def note(self, text: str) -> None:
        log.info(text)


def peak_memory_gb() -> float:
    """The peak resident memory of this process so far (a build's, run from the CLI)."""
    from llmc.host import peak_rss_mb

    return peak_rss_mb() / 1e3


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    cache_hit: bool = False


def output_path(config: BuildConfig, source_name: str) -> Path:
    draft = f"-draft{config.draft_layers}" if config.draft_layers else ""
    return config.out or DEFAULT_ARTIFACTS / f"{source_name}-{config.target}{draft}"


def _check_destination(path: Path) -> bool:
    """Refuse an --out that is not an artifact or cannot be written, before any heavy work and
    leaving nothing behind; True when it holds an artifact the build will replace."""
    probe = None
    try:
        replacing = (path / MANIFEST).is_file()
        if path.exists() and not replacing and (path.is_file() or any(path.iterdir())):
            raise LlmcError(
                f"{path} exists and is not an llmc artifact; choose another --out or remove it."
            )
        parent = path.absolute().parent
        while not parent.exists():  # the directories the build would create
            parent = parent.parent
        if not parent.is_dir():
            raise LlmcError(f"cannot write {path}: {parent} is a file; choose another --out.")
        probe = parent  # a directory the build could not create is refused here, not at the end
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent))
    except OSError as exc:
        where = f": {probe} does not take new directories" if probe else ""
        raise LlmcError(
            f"cannot write {path}{where} ({exc.strerror or exc}); choose another --out."
        ) from None
    return replacing


def build(config: BuildConfig, progress: Progress | None = None, loaded=None) -> BuildResult:
    """The stages, in order; every flag error is found before the first heavy one. `loaded`: the
    source already in memory (the targets of one multi-target build share it). An identical
    earlier build (llmc.cache) is reused instead of repeated."""
    from llmc import targets
    from llmc.compiler import sources
    from llmc.compiler.diagnose import emitting
    from llmc.compiler.pass_manager import PassContext, select

    progress = progress or Progress()
    progress.timings = {}  # this build's stages (one Progress serves every target of a build)
    target = targets.get(config.target)
    options = target.options(config)
    config.check()
    source = sources.resolve(config.model)
    out = output_path(config, source.name)
    replacing = _check_destination(out)
    quant = config.quant_config()
    passes = select(target.pipeline(quant=quant), config.passes, config.dump_after)
    started = time.perf_counter()
    cache = stage_cache(config)
    key = None
    if cache is not None:
        from llmc.cache import artifact_key

        key = artifact_key(config, source, target, passes)
        hit = cache.artifact(key) if key else None
        if hit is not None:
            result = _reuse(hit, out, started, progress)
            _say_replaced(progress, out, replacing)
            return result
    from llmc.dryrun import check_resources  # estimated memory and disk vs free (exit 2)

    check_resources(config, source, out)  # a cache hit needs neither: checked after the lookup
    ctx = PassContext(dump_dir=config.dump_dir, dump_after=config.dump_after, stage_cache=cache)

    if loaded is None:
        with progress.stage(f"load {source.kind} model {source.ref}"):
            loaded = sources.load(source)
    draft = None
    if config.draft_layers:
        from llmc.compiler.draft import keep_first_layers

        draft = keep_first_layers(loaded.model, config.draft_layers)
        progress.note(f"draft: the first {draft['layers']} of {draft['of']} layers")
    graph = _trace(config, loaded, passes, ctx, progress)
    calibration = None
    if quant is not None and (quant.calibrated or quant.drift_tokens):
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
    for note in (n for r in reports for n in r.notes if n.startswith("plan: ")):
        progress.note(note)  # a precision plan's choice (llmc inspect lists each layer's)

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
        from llmc.fidelity import check_tokenizer  # the runtime tokenizer == transformers' (exit 3)

        manifest["tokenizer"] = check_tokenizer(tmp, manifest["generation"], loaded.tokenizer)
        if draft:
            manifest["source"]["draft"] = draft
        if config.compat:
            from llmc.compat import write_files

            manifest["target"]["compat"] = config.compat
            write_files(config.compat, tmp, manifest, loaded)
        files = write_manifest(tmp, manifest)  # the session reads it during verification
        if config.verify:
            manifest["verification"] = _verify(config, source, loaded, target, tmp, graph, progress)
        if config.compat:
            manifest["runtimes"] = _check_runtimes(config, loaded, tmp, manifest, graph, progress)
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
        manifest["build"]["stage_seconds"] = dict(progress.timings)
        manifest["build"]["cache"] = {"hit": False, "key": key, "reused": dict(ctx.reused)}
        write_manifest(tmp, manifest, files)  # verification changed no file: reuse the hashes
    _say_replaced(progress, out, replacing)
    if cache is not None and key:
        cache.store_artifact(key, out, {"model": source.ref, "target": config.target,
                                        "quant": config.quant})  # fmt: skip
    return BuildResult(out, read_manifest(out, check_files=False))


def stage_cache(config: BuildConfig):
    """The stage cache this build uses: none with --no-cache, LLMC_NO_CACHE=1 or --dump-after
    (whose dumps come from running the passes)."""
    if not config.cache or config.dump_after or os.environ.get("LLMC_NO_CACHE") == "1":
        return None
    from llmc.cache import StageCache

    return StageCache()


def _say_replaced(progress: Progress, out: Path, replacing: bool) -> None:
    if replacing:
        progress.note(f"replaced the previous artifact at {out} (in one atomic rename)")


def _reuse(hit, out: Path, started: float, progress: Progress) -> BuildResult:
    """The artifact of an identical earlier build, put in place as a new build's would be."""
    from llmc.cache import link_tree

    with progress.stage(f"reuse the cached build {hit.key[:12]}"), atomic_directory(out) as tmp:
        link_tree(hit.path, tmp)
        manifest = dict(hit.manifest)
        before = manifest.get("build", {})
        manifest["build"] = {
            **before,
            "created": utc_now(),
            "seconds": round(time.perf_counter() - started, 1),
            "stage_seconds": dict(progress.timings),
            "peak_memory_gb": round(peak_memory_gb(), 2),
            "cache": {"hit": True, "key": hit.key, "built": before.get("created")},
        }
        write_manifest(tmp, manifest, manifest["files"])
    progress.note(
        f"cache hit: the trace, passes, quantized weights, emission and verification of an "
        f"identical build ({before.get('created')}) were reused; --no-cache rebuilds"
    )
    return BuildResult(out, read_manifest(out, check_files=False), cache_hit=True)


def _trace(config: BuildConfig, loaded, passes, ctx, progress):
    """The model spec (with --max-context), the trace-time passes' requests, torch.export."""
    from llmc.compiler.diagnose import tracing
    from llmc.compiler.graph import Graph
    from llmc.compiler.pass_manager import trace_options
    from llmc.compiler.spec import ModelSpec
    from llmc.compiler.trace import TraceResult, io_contract, trace

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
    if spec.recurrent is not None:
        options.recurrent_step = _check_recurrent(config, spec)
    cache = ctx.stage_cache
    key = cache.trace_key(loaded.source, spec, options, config.draft_layers) if cache else None
    program = cache.trace(key) if key else None
    if program is not None:
        progress.note(f"trace reused from the stage cache ({key[:12]})")
        ctx.reused["trace"] += 1
        return Graph.from_trace(TraceResult(program, io_contract(spec, options)), spec)
    with progress.stage("trace with torch.export"), tracing(loaded.model, spec.architecture):
        traced = trace(loaded.model, spec, options=options)
    if key:
        cache.store_trace(key, traced.program)
    return Graph.from_trace(traced, spec)


def _check_recurrent(config: BuildConfig, spec) -> int | None:
    """What a state-space model cannot have yet: a target without the recurrent mode, weight
    quantization (its scan's inputs come out of small projections no one has measured). Returns
    the target's positions per call of a recurrent graph (TargetInfo.recurrent_step)."""
    from llmc.errors import UnsupportedModelError
    from llmc.targets import TARGETS

    target = TARGETS[config.target]
    if not target.recurrent:
        able = ", ".join(t.name for t in TARGETS.values() if t.recurrent)
        raise UnsupportedModelError(
            f"{spec.architecture} (a recurrent state, no attention) builds for --target {able}, "
            f"not {config.target}."
        )
    flags = {"--quant": config.quant, "--draft-layers": config.draft_layers,
             "--compat": config.compat}  # fmt: skip
    flag = next((f for f, on in flags.items() if on), None)
    if flag:
        raise UnsupportedModelError(
            f"{flag} is not supported for {spec.architecture} (a state-space model) yet; build "
            "it without."
        )
    return target.recurrent_step


def _check_runtimes(config, loaded, directory: Path, manifest: dict, graph, progress) -> dict:
    """Which runtimes the artifact was checked against: llmc's (verification) and, where it is
    installed, the --compat vendor's greedy tokens against PyTorch's (exit 3 where it cannot run
    the artifact or, unquantized, computes other tokens; a quantized artifact's are recorded, as
    llmc's fast kernels are). OpenVINO runs at f32 here, as verification does."""
    from llmc.compat import VendorRuntimeError, check_artifact, problems, summary

    runtimes = {"llmc": {"checked": config.verify}}
    if not config.verify:
        return {**runtimes, config.compat: {"checked": False, "reason": "--no-verify"}}
    quantized = graph.quantization is not None
    with progress.stage(f"run {config.compat} on the artifact"):
        found = check_artifact(
            config.compat, directory, manifest, loaded, graph if quantized else None
        )
    progress.note(summary(config.compat, found))
    wrong = problems(found, quantized) if found["checked"] else []
    if wrong:
        raise VendorRuntimeError(
            f"{config.compat} runs the artifact, but {' and '.join(wrong)} from PyTorch's; "
            "nothing was written. Re-run with --debug and report it."
        )
    return {**runtimes, config.compat: found}


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
