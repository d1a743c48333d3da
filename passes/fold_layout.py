"""Remove layout round trips that rewrites leave between fused ops.

Before: t = transpose(transpose(y, 1, 2), 1, 2)            -> y
        z = flatten(view(y, [B, S, H, D]), 2)  (z has y's shape, only reshapes between) -> y
After:  uses of t and z read y directly.

Also folded: slices that keep a whole dim (x[..., :D] with D the size) and concatenations with
an empty part (cat([y, x[..., D:]]) -> y), which partial-rotary code leaves with full rotary.

Attention and rotary ops take packed [B, S, H*D] activations while the model's code moves
between [B, S, H*D] and [B, H, S, D]; after fusion these moves cancel out. Only transposes of
the same two dims and chains of pure reshapes (element order unchanged) are folded.
"""

from __future__ import annotations

from llmc.compiler.graph import Graph, shape_str
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, erase_unused, is_call

RESHAPES = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.alias.default,
)


def _whole_slice(node) -> bool:
    x, dim, start, end = (list(node.args) + [None] * 4)[:4]
    step = node.args[4] if len(node.args) > 4 else 1
    size = x.meta["val"].shape[dim]
    return (
        start in (0, None)
        and step == 1
        and isinstance(size, int)
        and isinstance(end, int)
        and end >= size
    )


def _empty(node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else 0
    return any(
        isinstance(p.meta["val"].shape[dim], int) and p.meta["val"].shape[dim] == 0
        for p in node.args[0]
    )


def _dims(node) -> frozenset:
    rank = node.meta["val"].dim()
    return frozenset(d % rank for d in node.args[1:3])


class FoldLayout(Pass):
    name = "fold_layout"
    attention_only = True

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        transposes = reshapes = 0
        changed = True
        while changed:
            changed = False
            for node in list(graph.fx.nodes):
                if node.graph is not graph.fx or not node.users:
                    continue
                source = None
                if is_call(node, aten.transpose.int):
                    inner = node.args[0]
                    if is_call(inner, aten.transpose.int) and _dims(inner) == _dims(node):
                        source = inner.args[0]
                        transposes += 1
                elif is_call(node, *RESHAPES):
                    target = shape_str(node)
                    inner = node.args[0]
                    while is_call(inner, *RESHAPES) and shape_str(inner) != target:
                        inner = inner.args[0]
                    if shape_str(inner) == target and target != "?":
                        source = inner
                        reshapes += 1
                elif is_call(node, aten.slice.Tensor) and _whole_slice(node):
                    source = node.args[0]
                    reshapes += 1
                elif is_call(node, aten.cat.default) and _empty(node):
                    dim = node.args[1] if len(node.args) > 1 else 0
                    parts = [p for p in node.args[0] if p.meta["val"].shape[dim] != 0]
                    if len(parts) == 1:
                        source = parts[0]
                        reshapes += 1
                if source is not None:
                    node.replace_all_uses_with(source)
                    erase_unused(graph, [node])
                    changed = True
        graph.fx.eliminate_dead_code()
        return PassReport(
            self.name,
            modified=transposes + reshapes > 0,
            counts={
                "folded": transposes + reshapes,
                "transposes": transposes,
                "reshapes": reshapes,
            },
        )
