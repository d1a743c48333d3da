"""`llmc build`: its flags (each named after a BuildConfig field), the progress display of the
build stages, and the summary it prints (registered in llmc.cli; the work is in llmc.build)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import click

from llmc.config import BuildConfig


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


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


@click.command()
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
    "--compat",
    type=click.Choice(["openvino-genai", "onnxruntime-genai"]),
    help="Also make the artifact load as it is in a vendor's runtime: openvino-genai "
    "(LLMPipeline, OpenVINO Model Server; --target openvino) or onnxruntime-genai (og.Model; "
    "--target onnx). Its graph then computes the last position's logits only (no speculative "
    "decoding or perplexity in llmc's runtime); the build checks the vendor runtime's greedy "
    "tokens where it is installed.",
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
