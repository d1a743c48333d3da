"""The server's Prometheus metrics, written in the text exposition format (version 0.0.4) without
a client library: counters, gauges read when scraped, and histograms with fixed buckets. Updated
from the server's event loop only."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {value:g}")
        if not self.values:
            lines.append(f"{self.name} 0")
        return lines


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {float(self.read()):g}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {count}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum:g}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    """Everything /metrics shows; the gauges read the batcher when scraped."""

    def __init__(self, batcher):
        b = batcher
        self.requests = Counter("llmc_requests_total", "Requests answered, by endpoint and status.")
        self.prompt_tokens = Counter("llmc_prompt_tokens_total", "Prompt tokens prefilled.")
        self.completion_tokens = Counter(
            "llmc_completion_tokens_total", "Tokens generated (end-of-sequence tokens included)."
        )
        self.cancelled = Counter(
            "llmc_requests_cancelled_total", "Requests whose client left before they finished."
        )
        self.ttft = Histogram(
            "llmc_time_to_first_token_seconds", "From a request's arrival to its first token."
        )
        self.itl = Histogram(
            "llmc_inter_token_latency_seconds", "Between two tokens of one streamed request."
        )
        self.duration = Histogram(
            "llmc_request_duration_seconds", "From a request's arrival to its last token."
        )
        self.gauges = [
            Gauge("llmc_queue_depth", "Requests waiting to join the batch.", lambda: b.queued),
            Gauge("llmc_running_requests", "Requests in the running batch.", lambda: b.running),
            Gauge(
                "llmc_kv_cache_bytes",
                "KV cache memory the running batch holds (allocated, padding included).",
                lambda: b.kv_bytes,
            ),
            Gauge("llmc_steps", "Model steps the batcher has run.", lambda: b.steps),
        ]

    def render(self) -> str:
        lines = []
        for metric in (
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.cancelled,
            self.ttft,
            self.itl,
            self.duration,
            *self.gauges,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
