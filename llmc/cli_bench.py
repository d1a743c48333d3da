"""`llmc bench`: the bench protocol for artifacts and servers from the command line (registered
in llmc.cli; the work is in llmc.benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmc.cli_run import THREADS
from llmc.errors import LlmcError


def _clients(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter("give client counts like 1,2,4,8.")
    return counts


@click.command()
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A running llmc serve (or any OpenAI-compatible server) to load with concurrent "
    "streaming clients (repeatable).",
)
@click.option("--clients", default="1,2,4,8", show_default=True, help="Client counts to run.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Measured rounds (medians), after one warm-up.")  # fmt: skip
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=2),
              help="New tokens per server client.")  # fmt: skip
@THREADS
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write results here.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw the results (PNG).")
def bench(artifacts, urls, clients, runs, new_tokens, threads, json_out, plot):
    """Measure ARTIFACTS (decode tokens/s, time to first token of a 512-token prompt, decode
    speed against context length) and servers given by --url (throughput and latency against
    the number of concurrent clients); print a table, optionally save JSON and a plot.

    \b
      llmc bench artifacts/smollm2-onnx artifacts/smollm2-openvino --plot bench.png
      llmc bench --url http://127.0.0.1:8000 --clients 1,2,4,8,16
    """
    from llmc import benchmark
    from llmc.artifact import read_manifest

    if not artifacts and not urls:
        raise click.UsageError("give at least one ARTIFACT or --url.")
    counts = _clients(clients)
    for path in artifacts:
        read_manifest(path, check_files=False)  # a clear error before any measuring
    if plot is not None and plot.suffix.lower() != ".png":
        raise LlmcError(f"--plot writes a PNG; name it something.png, not {plot.name}.")
    measured = []
    for path in artifacts:
        click.echo(f"measuring {path} …", err=True)
        measured.append(benchmark.profile_artifact(path, runs=runs, threads=threads))
    servers = []
    for url in urls:
        click.echo(f"loading {url} with {clients} clients …", err=True)
        import httpx

        try:
            servers.append(benchmark.load_test(url, counts, runs, new_tokens))
        except (OSError, httpx.HTTPError, KeyError, ValueError) as exc:
            raise LlmcError(
                f"cannot load {url} ({type(exc).__name__}: {exc}); is an OpenAI-compatible "
                "server running there?"
            ) from exc
    for line in benchmark.table(measured, servers):
        click.echo(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"artifacts": measured, "servers": servers}, indent=2))
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        benchmark.plot(measured, servers, plot)
        click.echo(f"plot written to {plot}", err=True)
