"""`llmc serve`: the OpenAI-compatible server (registered in llmc.cli; the work is in
llmc.server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from llmc.cli_run import EXACT, THREADS
from llmc.errors import LlmcError


def _require(*modules: str, extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LlmcError(f"{' and '.join(missing)} not installed; pip install 'llmc[{extra}]'.")


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model-name",
    help="The model name clients ask for [default: the artifact directory's name].",
)
@click.option(
    "--max-batch",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests decoded together in one step (continuous batching).",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait for a place in the batch; past it, 429 with Retry-After.",
)
@click.option(
    "--draft",
    type=click.Choice(["prompt-lookup"]),
    help="Speculative decoding by n-gram lookup in each request's prompt and text so far "
    "(greedy output unchanged; drafts adapt to each request's acceptance rate).",
)
@click.option("--num-draft", default=8, show_default=True, type=click.IntRange(1, 15))
@click.option(
    "--shutdown-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM, seconds requests in flight get to finish before they are cancelled.",
)
@THREADS
@EXACT
@click.option(
    "--precision",
    type=click.Choice(["f32", "bf16"]),
    help="OpenVINO artifacts: compute precision [default: what the artifact was built for]. "
    "bf16 (with the plugin's u8 KV cache) batches much faster where the CPU has AVX512-BF16 "
    "or AMX, and is not what the build verified.",
)
@click.option("--ray", is_flag=True, help="Deploy on Ray Serve (pip install 'llmc[ray]').")
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --ray: copies of the server, spread over the Ray cluster's nodes.",
)
@click.option(
    "--ray-address",
    help="With --ray: the cluster to join (default: RAY_ADDRESS, else a local Ray instance).",
)
def serve(
    artifact, host, port, model_name, threads, exact, precision, ray, replicas, ray_address, **opts
):
    """Serve ARTIFACT with an OpenAI-compatible API: POST /v1/chat/completions and
    /v1/completions (streaming with server-sent events), GET /v1/models, /health and /metrics
    (Prometheus). Requests share the model by continuous batching.

    \b
      llmc serve artifacts/smollm2-onnx --port 8000
      curl localhost:8000/v1/chat/completions -d '{"model": "smollm2-onnx",
           "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from llmc.artifact import read_manifest

    manifest = read_manifest(artifact, check_files=False)  # a clear error before anything starts
    if (replicas > 1 or ray_address) and not ray:
        raise click.UsageError("--replicas and --ray-address need --ray.")
    target = manifest.get("target", {}).get("name")
    if precision and target != "openvino":
        raise click.UsageError(f"--precision applies to OpenVINO artifacts; this one is {target}.")
    load = {"threads": threads, "exact": exact, **({"precision": precision} if precision else {})}
    if target == "openvino":  # the event loop computes beside each step (Options.pin_threads)
        load["pin_threads"] = False
    if ray:
        _require("ray", "starlette", extra="ray")
        from llmc.server.ray_serve import deploy

        deploy(artifact, host, port, replicas, ray_address, model_name, load, **opts)
        return
    _require("uvicorn", "starlette", extra="serve")
    from llmc.server.run import serve as run_server

    def ready():
        click.echo(f"serving {artifact} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM stops)",
                   err=True)  # fmt: skip

    timeout = opts.pop("shutdown_timeout")
    run_server(artifact, host, port, model_name, timeout, load, ready=ready, **opts)
