"""The `llmc` command line: parses flags, prints the resolved configuration, maps errors to exit
codes. The work happens in llmc.build, llmc.runtime and llmc.inspect."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from llmc.cli_bench import bench
from llmc.cli_build import build
from llmc.cli_cache import cache
from llmc.cli_run import evaluate, run
from llmc.cli_serve import serve
from llmc.errors import LlmcError, QualityGateError, VerificationError, refused_write
from llmc.interrupts import CtrlC

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_VERIFY, EXIT_INTERRUPT = 0, 1, 2, 3, 130


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
    """Re-run the parity check of ARTIFACT against PyTorch eager (needs its source model); a
    --compat artifact is also run by its vendor's runtime where that is installed."""
    from llmc.reverify import reverify

    result, vendor = reverify(artifact, tolerance)
    click.echo(f"verification: {result.summary()}")
    if not result.passed:
        raise VerificationError(f"{artifact} does not match PyTorch ({result.summary()}).")
    if vendor is None:
        return
    from llmc.compat import problems, summary

    compat = vendor["runtime"]
    click.echo(summary(compat, vendor))
    if vendor["checked"] and problems(vendor, quantized=False):  # llmc verify: fp32 only
        raise VerificationError(f"{compat} does not run {artifact} as PyTorch does.")


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


cli.add_command(build)
cli.add_command(run)
cli.add_command(cache)
cli.add_command(evaluate)
cli.add_command(serve)
cli.add_command(bench)


def main():
    cli(prog_name="llmc")


if __name__ == "__main__":
    main()
