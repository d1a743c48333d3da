"""Run the server on uvicorn, with a graceful SIGTERM: stop accepting, let requests in flight
finish for up to the shutdown deadline, cancel the rest, exit 0."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import uvicorn

SWITCH_INTERVAL = 0.0005  # seconds


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM also marks the service draining (/health answers 503)
    and afterwards returns normally instead of re-raising the signal (so the exit code is 0)."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != sig]


def default_name(artifact) -> str:
    """The model name a server answers to: the artifact directory's name."""
    return Path(artifact).resolve().name


def serve(
    artifact,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    shutdown_timeout: float = 30.0,
    load_options: dict | None = None,
    ready=None,
    **batcher_options,
) -> None:
    """Load the artifact and serve it until SIGTERM or Ctrl-C. `ready()` is called once the
    socket listens."""
    import llmc.runtime as rt
    from llmc.server.app import Service, create_app

    # The batcher's thread needs the GIL back at once after each model step, while the event
    # loop encodes chunks: a shorter switch interval than the default 5 ms keeps it from waiting.
    sys.setswitchinterval(SWITCH_INTERVAL)
    generator = rt.load(artifact, **(load_options or {}))
    service = Service(generator, name or default_name(artifact), **batcher_options)
    config = uvicorn.Config(
        create_app(service, shutdown_timeout),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=shutdown_timeout,
        lifespan="on",
    )
    server = Server(config, service)
    if ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                ready()

        server.startup = startup
    server.run()
