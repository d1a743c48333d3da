"""Graph: the traced program with the model spec and I/O names every pass and target sees."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from llmc.compiler.spec import ModelSpec


@dataclass
class Graph:
    program: torch.export.ExportedProgram
    spec: ModelSpec
    input_names: list[str]
    output_names: list[str]
    kv_mode: str = "concat"
    notes: list[str] = field(default_factory=list)

    @property
    def fx(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def op_histogram(self) -> dict[str, int]:
        """Count call_function targets by name, e.g. {'aten.mm.default': 14}."""
        counts = Counter(str(node.target) for node in self.fx.nodes if node.op == "call_function")
        return dict(sorted(counts.items()))

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.program.module()(*inputs))
