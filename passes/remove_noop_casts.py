"""Bypass casts that change nothing (in fp32, `x.to(float32)` is `x` itself).

Before: y = aten.to.dtype(x, f32); z = f(y)      where x is already f32 on the same device
After:  z = f(x)
Later pattern passes then see one value instead of an alias of it.
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import PassReport

_CASTS = (
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.device,
    torch.ops.aten._to_copy.default,
)


def _is_noop(node: torch.fx.Node) -> bool:
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or node.kwargs.get("copy", False):
        return False
    before, after = source.meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return (
        before.dtype == after.dtype
        and before.device == after.device
        and before.layout == after.layout
    )


class RemoveNoopCasts:
    name = "remove_noop_casts"

    def run(self, graph: Graph) -> PassReport:
        removed = 0
        for node in list(graph.fx.nodes):
            if node.op == "call_function" and node.target in _CASTS and _is_noop(node):
                node.replace_all_uses_with(node.args[0])
                graph.fx.erase_node(node)
                removed += 1
        return PassReport(self.name, modified=removed > 0, counts={"removed": removed})
