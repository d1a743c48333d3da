"""Pass protocol, PassReport and the pass manager that runs and numerically checks a pipeline."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from llmc.compiler.graph import Graph
from llmc.errors import LlmcError

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """What a pass did: `modified` is true only if the graph changed."""

    name: str
    modified: bool
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # graph after vs before, on example inputs

    @classmethod
    def matches(cls, name: str, count: int, notes: list[str], key: str = "fused") -> PassReport:
        """The report of a pattern pass: how many it rewrote, and one note per miss."""
        return cls(
            name, modified=count > 0, counts={key: count, "unmatched": len(notes)}, notes=notes
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Pass(Protocol):
    """A graph pass rewrites `graph` in place and reports what it did.

    A pass may also have `configure(options, model)`, called before tracing to ask something of
    the front end (attention, KV mode, a logits_index input). A trace-time pass
    (`stage = "trace"`) does all its work there; its `run` only reports what the traced graph
    shows."""

    name: str

    def run(self, graph: Graph) -> PassReport: ...


def trace_options(passes: list[Pass], model):
    """What the pipeline's trace-time passes ask of the front end."""
    from llmc.compiler.trace import TraceOptions

    options = TraceOptions()
    for p in passes:
        if hasattr(p, "configure"):
            p.configure(options, model)
    return options


class PassCheckError(Exception):
    """A pass changed what the graph computes: an llmc bug, never a user error."""


def select(passes: list[Pass], spec: str | None) -> list[Pass]:
    """Apply `--passes` edits such as "-eliminate_dead_code" (comma-separated) to a pipeline."""
    if not spec:
        return passes
    names = {p.name for p in passes}
    disabled = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name = item.lstrip("-")
        if not item.startswith("-") or name not in names:
            raise LlmcError(
                f"--passes takes names to disable such as '-{next(iter(sorted(names)))}'; "
                f"{item!r} is not one of: " + ", ".join(f"-{n}" for n in sorted(names)) + "."
            )
        disabled.add(name)
    return [p for p in passes if p.name not in disabled]


def run_pipeline(graph: Graph, passes: list[Pass], tolerance: float = 1e-5) -> list[PassReport]:
    """Run each pass, timing it and comparing the graph's outputs after it with those before."""
    inputs = graph.example_inputs(batch=2, seq=3, past=2)
    reference = graph.run(*inputs)
    reports = []
    for p in passes:
        start = time.perf_counter()
        report = p.run(graph)
        report.seconds = round(time.perf_counter() - start, 4)
        if report.modified and getattr(p, "stage", "graph") != "trace":
            graph.program.graph_module.recompile()
            outputs = graph.run(*inputs)
            diff = max(_difference(a, b) for a, b in zip(outputs, reference, strict=True))
            report.max_abs_diff = diff
            # relative to the outputs' scale: a real model's logits reach tens, and a matmul of
            # another shape (prune_lm_head) rounds differently in the last bits
            scale = max(1.0, *(float(r.abs().max()) for r in reference if r.numel()))
            # a lossy pass (quantization) reports its difference; the quality gate judges it
            allowed = getattr(p, "tolerance", tolerance) * scale
            if not diff <= allowed and not getattr(p, "lossy", False):
                raise PassCheckError(f"pass {p.name} changed the graph's outputs by {diff:.3g}")
            reference = outputs
        log.info("pass %s: modified=%s %s", p.name, report.modified, report.counts)
        reports.append(report)
    return reports


def _difference(after: torch.Tensor, before: torch.Tensor) -> float:
    """max |after - before| (infinite if the shapes differ)."""
    if after.shape != before.shape:
        return float("inf")
    return (after - before).abs().max().item() if after.numel() else 0.0
