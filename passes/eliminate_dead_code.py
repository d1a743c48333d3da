"""Erase nodes whose results nothing uses (side-effect-free ones only), and the weights and
constants nothing reads any more.

Before: a = aten.mul(x, 2); out = aten.add(x, 1)     (a unused)
After:  out = aten.add(x, 1)
"""

from __future__ import annotations

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport


class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        before = len(graph.fx.nodes)
        graph.fx.eliminate_dead_code()
        removed = before - len(graph.fx.nodes)
        tensors = graph.drop_unused_tensors()
        return PassReport(
            self.name,
            modified=removed + tensors > 0,
            counts={"removed": removed, "tensors": tensors},
        )
