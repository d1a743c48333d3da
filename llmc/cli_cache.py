"""`llmc cache list|clear`: the build stage cache (llmc.cache)."""

from __future__ import annotations

import time

import click


@click.group()
def cache():
    """The build stage cache: finished artifacts, traces and quantized weights, reused by identical
    builds (`llmc build --no-cache` bypasses it). It lives in $LLMC_CACHE/stages (default
    ~/.cache/llmc) and is capped at $LLMC_CACHE_MAX_GB (default 20), least recently used first
    out."""


@cache.command("list")
def list_entries():
    """Every entry, most recently used first, and the total against the cap."""
    from llmc.cache import StageCache, max_bytes

    stages = StageCache()
    entries = stages.entries()
    for e in entries:
        about = e["about"]
        what = " ".join(str(about[k]) for k in ("model", "target", "quant") if about.get(k))
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        click.echo(f"{e['kind']:<10} {e['key'][:16]}  {e['bytes'] / 1e6:9.1f} MB  {used}  {what}")
    total = sum(e["bytes"] for e in entries)
    click.echo(
        f"{len(entries)} entries, {total / 1e9:.2f} GB of {max_bytes() / 1e9:.0f} GB "
        f"in {stages.root}"
    )


@cache.command()
@click.option(
    "--kind",
    type=click.Choice(["artifacts", "trace", "quant"]),
    help="Only this kind [default: all].",
)
def clear(kind):
    """Remove the cached entries (artifacts built from them stay)."""
    from llmc.cache import StageCache

    freed = StageCache().clear(kind)
    click.echo(f"freed {freed / 1e6:.1f} MB")
