"""The Pass base class, PassContext, PassReport, and the manager that checks a pipeline's
requirements, runs it and checks every pass numerically."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

import torch

from llmc.compiler.graph import Graph
from llmc.errors import LlmcError

log = logging.getLogger(__name__)


class Stage(str, Enum):
    TRACE = "trace"  # works through the front end (configure); run() reports what the trace shows
    GRAPH = "graph"  # rewrites the traced graph in run()


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


@dataclass
class PassContext:
    """What a pipeline's passes share besides the graph: calibration data, what trace-time
    passes noted before the graph existed, and the debugging dumps asked for."""

    calibration: list[torch.Tensor] = field(default_factory=list)  # token id rows [S]
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dump_after: tuple[str, ...] = ()
    dump_dir: Path = Path("llmc-dumps")
    dumped: list[Path] = field(default_factory=list)
    stage_cache: object | None = None  # llmc.cache.StageCache: quantized weights kept on disk
    # what this build took from the stage cache or an earlier target (recorded under "build")
    reused: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def note(self, pass_name: str, text: str) -> None:
        self.notes[pass_name].append(text)


class Pass:
    """A graph pass: rewrites `graph` in place in `run` and reports what it did.

    name: verb_object, also its file name and its `--passes` name.
    stage: Stage.TRACE passes do their work in `configure`, before tracing (attention through
        transformers' interface, the KV mode); their `run` reports what the traced graph shows.
    requires: names of passes that must run earlier in the pipeline (disabling one is an error).
    tolerance: how far (relative to the outputs' scale) the outputs may move; a pass exact only
        in real arithmetic raises it.
    lossy: the difference is recorded, not refused (quantization; perplexity judges it).
    attention_only: it rewrites attention, its projections, RoPE or the KV cache, which a
        state-space model (a recurrent state, no attention) does not have: skipped there.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.GRAPH
    requires: ClassVar[tuple[str, ...]] = ()
    tolerance: ClassVar[float] = 1e-5
    lossy: ClassVar[bool] = False
    attention_only: ClassVar[bool] = False

    def configure(self, options, model: torch.nn.Module, ctx: PassContext) -> None:
        """Ask the front end for something before tracing (TraceOptions); most passes don't."""

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        raise NotImplementedError

    @staticmethod
    def fail(reason: str, node: torch.fx.Node | None = None) -> str:
        """The note for a place the pass did not match: which node blocked it, and why."""
        return f"{node.name}: {reason}" if node is not None else reason


def trace_options(passes: list[Pass], model: torch.nn.Module, ctx: PassContext):
    """What the pipeline's passes ask of the front end."""
    from llmc.compiler.trace import TraceOptions

    options = TraceOptions()
    for p in passes:
        p.configure(options, model, ctx)
    return options


class PassCheckError(Exception):
    """A pass changed what the graph computes: an llmc bug, never a user error."""


def check_requirements(passes: list[Pass]) -> None:
    """Every pass's `requires` runs before it (an llmc bug in a target's pipeline if not)."""
    seen: set[str] = set()
    for p in passes:
        missing = [r for r in p.requires if r not in seen]
        if missing:
            raise ValueError(f"pass {p.name} needs {', '.join(missing)} earlier in the pipeline")
        seen.add(p.name)


def select(passes: list[Pass], spec: str | None, dump_after: tuple[str, ...] = ()) -> list[Pass]:
    """Apply `--passes` edits such as "-eliminate_dead_code" (comma-separated) to a pipeline;
    disabling a pass that others need is refused, naming them. `--dump-after` must name a pass
    the pipeline then runs."""
    check_requirements(passes)
    if not spec:
        return _check_dumps(passes, dump_after)
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
    kept = [p for p in passes if p.name not in disabled]
    for name in sorted(disabled):
        needs = [p.name for p in kept if name in p.requires]
        if needs:
            chain = _dependents(passes, name)
            raise LlmcError(
                f"--passes -{name} would leave {', '.join(needs)} without it; disable those too "
                f"(--passes {','.join('-' + n for n in chain)}) or keep {name}."
            )
    return _check_dumps(kept, dump_after)


def _check_dumps(passes: list[Pass], dump_after: tuple[str, ...]) -> list[Pass]:
    """`--dump-after` must name a pass the pipeline will run."""
    for name in dump_after:
        if name not in {p.name for p in passes}:
            raise LlmcError(
                f"--dump-after {name}: not a pass this pipeline runs; choose one of: "
                + ", ".join(p.name for p in passes)
                + "."
            )
    return passes


def _dependents(passes: list[Pass], name: str) -> list[str]:
    """`name` and every pass that needs it, directly or through another, in pipeline order."""
    chain = {name}
    for p in passes:
        if chain & set(p.requires):
            chain.add(p.name)
    return [p.name for p in passes if p.name in chain]


def run_pipeline(
    graph: Graph, passes: list[Pass], ctx: PassContext | None = None
) -> list[PassReport]:
    """Run each pass, timing it and comparing the graph's outputs after it with those before."""
    ctx = ctx or PassContext()
    inputs = graph.example_inputs(batch=2, seq=3, past=2)
    reference = graph.run(*inputs)
    reports = []
    for index, p in enumerate(passes):
        start = time.perf_counter()
        if p.attention_only and graph.spec.recurrent is not None:
            reports.append(PassReport(p.name, False, notes=["skipped: no attention (recurrent)"]))
            continue
        report = p.run(graph, ctx)
        report.seconds = round(time.perf_counter() - start, 4)
        if report.modified and p.stage is not Stage.TRACE:
            graph.program.graph_module.recompile()
            outputs = graph.run(*inputs)
            diff = max(_difference(a, b) for a, b in zip(outputs, reference, strict=True))
            report.max_abs_diff = diff
            # relative to the outputs' scale: a real model's logits reach tens, and a matmul of
            # another shape (prune_lm_head) rounds differently in the last bits
            scale = max(1.0, *(float(r.abs().max()) for r in reference if r.numel()))
            # a lossy pass (quantization) reports its difference; the quality gate judges it
            if not diff <= p.tolerance * scale and not p.lossy:
                raise PassCheckError(f"pass {p.name} changed the graph's outputs by {diff:.3g}")
            reference = outputs
        if p.name in ctx.dump_after:
            ctx.dumped.append(_dump(graph, ctx.dump_dir, index, p.name))
        log.info("pass %s: modified=%s %s", p.name, report.modified, report.counts)
        reports.append(report)
    return reports


def _dump(graph: Graph, directory: Path, index: int, name: str) -> Path:
    """The graph's readable code after pass `name` (`llmc build --dump-after NAME`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:02d}-{name}.py"
    code = graph.program.graph_module.print_readable(print_output=False)
    path.write_text(f"# the graph after pass {name}\n{code}")
    return path


def _difference(after: torch.Tensor, before: torch.Tensor) -> float:
    """max |after - before| (infinite if the shapes differ)."""
    if after.shape != before.shape:
        return float("inf")
    return (after - before).abs().max().item() if after.numel() else 0.0
