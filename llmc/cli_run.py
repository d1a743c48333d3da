"""`llmc run` and `llmc eval`: the commands that execute an artifact (registered in llmc.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmc.config import BuildConfig

THREADS = click.option(
    "--threads", type=click.IntRange(min=1), help="Intra-op threads (default: all cores)."
)
EXACT = click.option(
    "--exact",
    is_flag=True,
    help="Quantized artifacts: exact kernels instead of the fast int8-activation ones (slower; "
    "`llmc inspect` shows how far the fast ones are).",
)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option(
    "--chat", is_flag=True, help="Wrap PROMPT in the model's chat template as a user turn."
)
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="0 is greedy decoding.",
)
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 is off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--repetition-penalty",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
)
@click.option("--seed", type=int, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@THREADS
@click.option(
    "--draft",
    metavar="prompt-lookup|DIR",
    help="Speculative decoding: draft tokens by n-gram lookup in the prompt and text so far, or "
    "with a draft artifact of the same tokenizer (e.g. `llmc build --draft-layers N`). Greedy "
    "output is unchanged; sampled output keeps its distribution.",
)
@click.option(
    "--num-draft",
    type=click.IntRange(1, 15),
    help="Most tokens drafted per step (adapted to the acceptance rate) [default: 15 for "
    "prompt-lookup, 4 for a draft artifact].",
)
@click.option("--stats", is_flag=True, help="Print token counts and draft acceptance to stderr.")
@EXACT
def run(
    artifact,
    prompt,
    chat,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    seed,
    stop,
    threads,
    draft,
    num_draft,
    stats,
    exact,
):
    """Generate text from PROMPT with ARTIFACT, streaming it to stdout."""
    import llmc.runtime as rt

    if num_draft is not None and draft is None:
        raise click.UsageError("--num-draft needs --draft prompt-lookup or --draft DIR.")
    gen = rt.load(artifact, threads=threads, exact=exact)
    if draft is not None and draft != "prompt-lookup":
        draft = rt.load(draft, threads=threads, exact=exact, spin=False)
    for event in gen.events(
        prompt,
        chat=chat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        draft=draft,
        num_draft=num_draft,
    ):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        usage = event.usage
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        rate = f"{usage.accepted}/{usage.drafted} drafted tokens accepted, " if draft else ""
        click.echo(
            f"{usage.prompt_tokens} prompt + {usage.completion_tokens} new tokens in "
            f"{usage.steps + 1} model steps; {rate}finish: {event.finish_reason}",
            err=True,
        )


@click.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--perplexity",
    "text",
    required=True,
    type=click.Path(path_type=Path),
    help="UTF-8 text file to score.",
)
@click.option(
    "--window",
    type=click.IntRange(min=2),
    help="Tokens per window [default: min(512, the artifact's context)].",
)
@click.option("--stride", type=click.IntRange(min=1), help="Window step [default: window / 2].")
@click.option(
    "--max-tokens",
    default=BuildConfig.eval_tokens,
    show_default=True,
    type=click.IntRange(min=0),
    help="Score the text's first N tokens (0: all of it).",
)
@click.option(
    "--path",
    "scoring",
    type=click.Choice(["prefill", "decode"]),
    default="prefill",
    show_default=True,
    help="prefill: each window in one step (the prompt kernels); decode: one token per step, "
    "teacher-forced (the kernels that generate text; slower).",
)
@THREADS
@EXACT
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(artifact, text, window, stride, max_tokens, scoring, threads, exact, as_json):
    """Perplexity of ARTIFACT on a text, in strided windows: every token after the first is
    predicted once, with at least window - stride tokens of context. Any target gives
    comparable numbers."""
    from rich.console import Console
    from rich.progress import Progress

    from llmc.evaluate import evaluate_artifact

    with Progress(console=Console(stderr=True, highlight=False), transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        result = evaluate_artifact(
            artifact,
            text,
            threads=threads,
            exact=exact,
            scoring=scoring,
            window=window,
            stride=stride,
            max_tokens=max_tokens,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"perplexity {result['perplexity']:.4f}  ({scoring} path, {result['tokens']} tokens of "
            f"{result['file']}, {result['windows']} windows of {result['window']}, "
            f"stride {result['stride']})"
        )
