"""Bypass casts that change nothing (in fp32, `x.to(float32)` is `x` itself), and dropout in
inference (Phi-3 keeps `dropout(x, p, train=False)` in its graph).

Before: y = aten.to.dtype(x, f32); z = f(y)      where x is already f32 on the same device
After:  z = f(x)
Later pattern passes then see one value instead of an alias of it.
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport

_CASTS = (
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.device,
    torch.ops.aten._to_copy.default,
)
_NOOPS = (*_CASTS, torch.ops.aten.dropout.default)


def _is_noop(node: torch.fx.Node) -> bool:
    if node.target is torch.ops.aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
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


class RemoveNoopCasts(Pass):
    name = "remove_noop_casts"

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        removed = 0
        for node in list(graph.fx.nodes):
            if node.op == "call_function" and node.target in _NOOPS and _is_noop(node):
                node.replace_all_uses_with(node.args[0])
                graph.fx.erase_node(node)
                removed += 1
        return PassReport(self.name, modified=removed > 0, counts={"removed": removed})
