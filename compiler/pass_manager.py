"""Pass protocol, PassReport and the pass manager that runs and numerically checks a pipeline."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from llmc.compiler.graph import Graph
from llmc.compiler.trace import example_inputs
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

    def to_dict(self) -> dict:
        return asdict(self)


class Pass(Protocol):
    name: str

    def run(self, graph: Graph) -> PassReport: ...


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
    inputs = example_inputs(graph.spec, batch=1, seq=3, past=2)
    reference = graph.run(*inputs)
    reports = []
    for p in passes:
        start = time.perf_counter()
        report = p.run(graph)
        report.seconds = round(time.perf_counter() - start, 4)
        if report.modified:
            graph.program.graph_module.recompile()
            outputs = graph.run(*inputs)
            diff = max((a - b).abs().max().item() for a, b in zip(outputs, reference, strict=False))
            report.max_abs_diff = diff
            if not diff <= tolerance:
                raise PassCheckError(f"pass {p.name} changed the graph's outputs by {diff:.3g}")
            reference = outputs
        log.info("pass %s: modified=%s %s", p.name, report.modified, report.counts)
        reports.append(report)
    return reports
