"""`llmc serve --ray`: the same app as a Ray Serve deployment of N replicas, each loading the
artifact once and running its own continuous batcher; Ray's proxy spreads requests over them.
On one machine `ray.init()` starts a local Ray instance; with `--ray-address` (or RAY_ADDRESS)
the replicas go to an existing cluster, on any node that can read the artifact's path."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class Replica:
    """One Ray Serve replica: the artifact loaded, a Service and its Starlette app."""

    def __init__(self, artifact: str, name: str, load: dict, batcher: dict, shutdown: float):
        import llmc.runtime as rt
        from llmc.server.app import Service

        self.service = Service(rt.load(artifact, **load), name, **batcher)
        self.shutdown = shutdown

    def __serve_build_asgi_app__(self):
        from llmc.server.app import create_app

        return create_app(self.service, self.shutdown)


def deploy(artifact, host, port, replicas, address, name, load, shutdown_timeout=30.0, **batcher):
    """Start Ray Serve on host:port with `replicas` copies of the server; block until SIGTERM or
    Ctrl-C, then shut the deployment (and a local Ray instance) down."""
    import ray
    from ray import serve

    from llmc.server.run import default_name

    artifact = str(Path(artifact).resolve())  # replicas may start in another directory
    cpus = load.get("threads") or 1
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="llmc",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus},
        max_ongoing_requests=batcher.get("max_batch", 16) + batcher.get("max_queue", 64),
        graceful_shutdown_timeout_s=shutdown_timeout,
        graceful_shutdown_wait_loop_s=0.5,
    )
    app = deployment.bind(artifact, name or default_name(artifact), load, batcher,
                          shutdown_timeout)  # fmt: skip

    def stop(sig, frame):  # the first SIGTERM stops serving; the shutdown then runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    local = not (address or os.environ.get("RAY_ADDRESS"))
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="llmc", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        if not local:  # leave the cluster's Serve instance running, without this app
            serve.delete("llmc")
        ray.shutdown()  # a local instance goes with it (Serve's own shutdown waits 30 s)
