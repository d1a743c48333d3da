"""The `llmc` command line: parses flags, prints the resolved configuration, maps errors to exit
codes. The work happens in llmc.build, llmc.runtime and llmc.inspect."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import click

from llmc.cli_bench import bench
from llmc.cli_cache import cache
from llmc.cli_run import evaluate, run
from llmc.cli_serve import serve
from llmc.config import BuildConfig
from llmc.errors import LlmcError, QualityGateError, VerificationError, refused_write
from llmc.interrupts import CtrlC

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_VERIFY, EXIT_INTERRUPT = 0, 1, 2, 3, 130


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Maps llmc's exceptions to exit codes with one line on stderr (traceback with --debug)."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or "--debug" in sys.argv
        ctrl_c = CtrlC()
        try:
            return super().invoke(ctx)
        except LlmcError as exc:
            if ctrl_c.seen:  # a wrapped error a Ctrl-C caused (an interrupted import, say)
                ctrl_c.exiting()
                _fail("interrupted; nothing was written.", EXIT_INTERRUPT, debug)
            _fail(f"error: {exc}", EXIT_USER, debug)
        except QualityGateError as exc:
            _fail(f"quality gate failed: {exc}", EXIT_VERIFY, debug)
        except VerificationError as exc:
            _fail(f"verification failed: {exc}", EXIT_VERIFY, debug)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except (KeyboardInterrupt, Exception) as exc:
            if isinstance(exc, KeyboardInterrupt) or ctrl_c.seen:  # or a library error it caused
                ctrl_c.exiting()
                _fail("interrupted; nothing was written.", EXIT_INTERRUPT, debug)
            if (refused := refused_write(exc)) is not None:  # a full disk, a read-only one
                _fail(f"error: {refused}", EXIT_USER, debug)
            _fail(  # an llmc bug: say so, keep the traceback behind --debug
                f"internal error: {type(exc).__name__}: {exc} (re-run with --debug for the "
                "traceback and report it)",
                EXIT_INTERNAL,
                debug,
            )
        finally:
            ctrl_c.restore()


def _fail(message: str, code: int, debug: bool):
    if debug:
        import traceback

        traceback.print_exc()
    click.echo(message, err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="llmc")
def cli(debug: bool):
    """llmc compiles Hugging Face language models into verified inference artifacts and runs them.

    \b
      llmc build [MODEL] --target onnx      trace, optimize, emit and verify
      llmc run ARTIFACT "prompt"            generate text (streams to stdout)
      llmc inspect ARTIFACT                 manifest, op histogram, pass reports
      llmc eval ARTIFACT --perplexity FILE  perplexity on a text (strided windows)
      llmc serve ARTIFACT                   OpenAI-compatible server (continuous batching)
      llmc bench ARTIFACT... [--url URL]    speed table and plot, artifacts and servers
      llmc cache list|clear                 the build stage cache
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


class _RichProgress:
    """Build stages as spinners with elapsed time, then a check mark and the duration."""

    def __init__(self):
        self.console = _console()
        self.timings: dict[str, float] = {}  # as llmc.build.Progress keeps them

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        with self.console.status(f"{name} …"):
            yield
        from llmc.build import peak_memory_gb

        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 2)
        self.console.print(
            f"[green]✓[/green] {name} [dim]({seconds:.1f}s, peak memory "
            f"{peak_memory_gb():.1f} GB)[/dim]"
        )

    def note(self, text: str) -> None:
        self.console.print(f"  {text}")


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--target",
    "-t",
    default="onnx",
    show_default=True,
    help="Back end to emit for; `llmc targets` lists them. Several, comma-separated "
    "(onnx,openvino): one load and quantization, every target emitted, and the artifacts "
    "cross-checked against each other (with --out DIR, target T goes to DIR/T).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    help="Artifact directory (default: artifacts/<model>-<target>).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check the artifact against PyTorch eager before keeping it.",
)
@click.option(
    "--passes",
    metavar="-NAME[,-NAME]",
    help="Disable passes of the target's pipeline, e.g. -eliminate_dead_code.",
)
@click.option(
    "--tolerance",
    type=float,
    help="Max abs logits difference allowed (default 1e-4 tiny models, 1e-3 others).",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=2),
    help="Largest sequence the artifact accepts (default: the model's).",
)
@click.option(
    "--draft-layers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Build a draft for speculative decoding: the model's first N layers with its final "
    "norm and lm_head (default out: artifacts/<model>-<target>-draftN). Use it with "
    "`llmc run ART PROMPT --draft DIR`.",
)
@click.option(
    "--precision",
    type=click.Choice(["f32", "bf16"]),
    help="OpenVINO only: the compute precision the artifact runs at [default: f32, exact; bf16 "
    "is faster on CPUs with AMX/AVX512-BF16 and is not verified].",
)
@click.option(
    "--autotune/--no-autotune",
    default=None,
    help="inductor only: benchmark Inductor's C++ GEMM template against ATen's for every matmul "
    "and keep the faster [default: autotune; SmolLM2 decodes 2.6x faster, and builds in 4.5 "
    "instead of 2.5 min].",
)
@click.option(
    "--quant",
    type=click.Choice(["int8", "int4", "gptq", "awq"]),
    help="Weight-only quantization: int8/int4 round-to-nearest, or 4-bit GPTQ/AWQ (calibrated).",
)
@click.option(
    "--group-size",
    default=BuildConfig.group_size,
    show_default=True,
    type=click.IntRange(min=0),
    help="Input channels per quantization scale (a power of two >= 16); 0: one per output row.",
)
@click.option(
    "--sym/--asym",
    default=None,
    help="Symmetric or asymmetric grid [default: sym for int8, asym for 4-bit].",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Text file for GPTQ/AWQ calibration [default: a short text shipped with llmc].",
)
@click.option(
    "--calib-samples",
    default=BuildConfig.calib_samples,
    show_default=True,
    type=click.IntRange(min=1),
    help="Calibration sequences.",
)
@click.option(
    "--calib-seqlen",
    default=BuildConfig.calib_seqlen,
    show_default=True,
    type=click.IntRange(min=8),
    help="Tokens per calibration sequence.",
)
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(path_type=Path),
    help="Measure perplexity on this text (artifact and fp32 PyTorch) and record it.",
)
@click.option(
    "--eval-tokens",
    default=BuildConfig.eval_tokens,
    show_default=True,
    type=click.IntRange(min=0),
    help="Tokens of the --eval text to score (0: all).",
)
@click.option(
    "--max-ppl-increase",
    metavar="PCT",
    help="Refuse (exit 3) an artifact whose --eval perplexity exceeds fp32's by more, e.g. 3%. "
    "With a 4-bit --quant it also sets a precision plan: each matmul gets the fastest form "
    "(4-bit symmetric, the source's exact grid, or 8 bits) that keeps the calibration "
    "perplexity within the budget, ranked by its measured drift (printed; llmc inspect).",
)
@click.option(
    "--plan/--no-plan",
    default=True,
    show_default=True,
    help="With a 4-bit --quant, let --max-ppl-increase choose each matmul's form; --no-plan keeps "
    "the fixed recipe and only gates it.",
)
@click.option(
    "--drift-tokens",
    default=BuildConfig.drift_tokens,
    show_default=True,
    type=click.IntRange(min=0),
    help="Calibration tokens on which each quantized matmul's drift (the KL divergence of the "
    "logits when only it is quantized) is measured and recorded; 0: not measured.",
)
@click.option(
    "--dump-after",
    multiple=True,
    metavar="PASS",
    help="Write the graph after this pass to llmc-dumps/NN-PASS.py (repeatable; debugging).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (configuration, passes, features, memory, size and KV-cache estimates, "
    "whether it fits here) in seconds, without building. A build refuses (exit 2) to start when "
    "its estimate exceeds free memory or disk; LLMC_SKIP_RESOURCE_CHECK=1 skips that check.",
)
@click.option(
    "--cache/--no-cache",
    default=True,
    show_default=True,
    help="Reuse an identical earlier build (same source, options, passes, llmc and toolchain "
    "versions, target and CPU) from the stage cache; `llmc cache` lists and clears it.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON result on stdout (artifacts, files and sizes, verification, quality "
    "gate, timings, cache hits, cross-check); progress stays on stderr.",
)
def build(max_ppl_increase, as_json, **flags):
    """Build MODEL into a verified artifact.

    MODEL is a Hugging Face model directory, a .gguf file, a hub id, or tiny:ARCH (llama, qwen2,
    mistral, phi3, gemma, gpt2, qwen3, gemma2, olmo2, granite, smollm3, phi, falcon, cohere).
    Any decoder-only causal LM transformers loads is tried. Without MODEL, the packaged
    SmolLM2-135M-Instruct is used. Exit codes: 0 ok, 2 bad input or a model that cannot be
    traced or emitted, 3 verification or quality gate failed, 1 internal error.
    """
    from llmc.build import build as run_build

    dry_run = flags.pop("dry_run")
    # every flag is named after its BuildConfig field
    config = BuildConfig(**flags, max_ppl_increase=_fraction(max_ppl_increase))
    if dry_run:
        from llmc.dryrun import plan, render

        click.echo(render(plan(config)))
        return
    console = _console()
    console.print(
        "llmc build " + "  ".join(f"{k}=[bold]{v}[/bold]" for k, v in config.describe().items())
    )
    record = None
    if "," in config.target:
        from llmc.crosscheck import build_targets

        results, record = build_targets(config, progress=_RichProgress())
    else:
        results = [run_build(config, progress=_RichProgress())]
    for result in results:
        files = result.manifest["files"]
        size = sum(f["size"] for f in files.values()) / 1e6
        how = "reused from the cache" if result.cache_hit else "built"
        console.print(
            f"[bold green]{how}[/bold green] {result.path} ({size:.1f} MB, "
            f"{result.manifest['graph']['nodes']} nodes, {result.manifest['build']['seconds']}s, "
            f"peak memory {result.manifest['build'].get('peak_memory_gb')} GB)"
        )
    if as_json:
        from llmc.build_report import report

        click.echo(json.dumps(report(results, record), indent=1))
    else:
        click.echo("\n".join(str(r.path) for r in results))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(artifact, as_json):
    """Summarize ARTIFACT: model, target, sizes, op histogram, pass reports, verification."""
    from llmc.artifact import read_manifest
    from llmc.inspect import render

    manifest = read_manifest(artifact, check_files=False)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    try:
        render(manifest, artifact)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        from llmc.errors import ArtifactError

        raise ArtifactError(  # a field a report reads is missing or of another type
            f"{artifact}/llmc.json is malformed ({type(exc).__name__} {str(exc)[:80]}); "
            "rebuild the artifact."
        ) from None


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--tolerance", type=float, help="Override the artifact's recorded tolerance.")
def verify(artifact, tolerance):
    """Re-run the parity check of ARTIFACT against PyTorch eager (needs its source model)."""
    from llmc.reverify import reverify

    result = reverify(artifact, tolerance)
    click.echo(f"verification: {result.summary()}")
    if not result.passed:
        raise VerificationError(f"{artifact} does not match PyTorch ({result.summary()}).")


def _fraction(text: str | None) -> float | None:
    """'5%' or '0.05' -> 0.05."""
    if text is None:
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a percentage such as 5%.") from None
    if value < 0:
        raise click.BadParameter(f"{text!r} must not be negative.")
    return value


@cli.command()
def targets():
    """List the back ends, whether they are usable here, and how to install the rest."""
    from llmc.targets import TARGETS

    for info in TARGETS.values():
        missing = info.missing()
        if not info.ready:
            status = "planned"
        elif missing:
            status = f"not installed ({info.install})"
        elif info.missing(for_runtime=True):
            status = f"builds; runs where {info.runtime} is"
        else:
            status = "ready"
        runtime = f" [runtime: {info.runtime}]" if info.runtime else ""
        click.echo(f"{info.name:<10} {status:<40} {info.description}{runtime}")


cli.add_command(run)
cli.add_command(cache)
cli.add_command(evaluate)
cli.add_command(serve)
cli.add_command(bench)


def main():
    cli(prog_name="llmc")


if __name__ == "__main__":
    main()
