"""Erase the tensor-metadata assertions torch.export leaves behind (they lower to nothing).

Before: y = aten._assert_tensor_metadata(x, dtype=f32)   (no users)
After:  (gone)
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport

_ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default,)


class RemoveAssertions(Pass):
    name = "remove_assertions"

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        removed = 0
        for node in list(graph.fx.nodes):
            if node.op == "call_function" and node.target in _ASSERTIONS and not node.users:
                graph.fx.erase_node(node)
                removed += 1
        return PassReport(self.name, modified=removed > 0, counts={"removed": removed})
