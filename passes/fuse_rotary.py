"""Fuse rotary position embeddings into `llmc::rotary` with tables for the whole context.

Before: cos, sin = f(position_ids)                  (the model's rotary module: any scaling)
        y = x * cos[:, None] + cat(-x[..., D/2:], x[..., :D/2]) * sin[:, None]     x [B, H, S, D]
After:  y = llmc.rotary(x as [B, S, H*D], cos_table, sin_table, position_ids)
        (viewed back as [B, H, S, D]; fold_layout removes the transposes)

The tables are computed by running the model's own cos/sin subgraph for positions
0..max_context-1 (so RoPE scaling is folded in as the model computes it) and never at the
trace's length. Tables must repeat their first half (the non-interleaved layout).
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph, module_path
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import NeedsInput, aten, erase_unused, evaluate, is_call


def _rotate_half_source(node) -> torch.fx.Node | None:
    """x if node == cat(-x[..., D/2:], x[..., :D/2], -1), else None."""
    if not is_call(node, aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    if len(parts) != 2 or dim not in (-1, 3):
        return None
    neg, low = parts
    if not is_call(neg, aten.neg.default) or not is_call(neg.args[0], aten.slice.Tensor):
        return None
    high = neg.args[0]
    if not is_call(low, aten.slice.Tensor) or high.args[0] is not low.args[0]:
        return None
    x = low.args[0]
    d = x.meta["val"].shape[-1]
    if low.args[1:4] not in ((3, 0, d // 2), (-1, 0, d // 2)) or high.args[2] != d // 2:
        return None
    return x


def _match(node):
    """(x, cos, sin) when node == x * unsqueeze(cos) + rotate_half(x) * unsqueeze(sin)."""
    if not is_call(node, aten.add.Tensor):
        return None
    a, b = node.args[:2]
    if not (is_call(a, aten.mul.Tensor) and is_call(b, aten.mul.Tensor)):
        return None
    for first, second in ((a, b), (b, a)):
        x, cos_u = first.args
        for rot, sin_u in (second.args, second.args[::-1]):
            if _rotate_half_source(rot) is x and is_call(cos_u, aten.unsqueeze.default):
                if is_call(sin_u, aten.unsqueeze.default) and cos_u.args[1] == sin_u.args[1] == 1:
                    return x, cos_u.args[0], sin_u.args[0]
    return None


class FuseRotary(Pass):
    name = "fuse_rotary"
    attention_only = True

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        fused, notes, tables = 0, [], {}
        matches = [(n, m) for n in graph.fx.nodes if (m := _match(n)) is not None]
        positions = graph.user_input("position_ids")
        length = graph.spec.max_context
        for node, (x, cos, sin) in matches:
            where = f"{node.name} ({module_path(node)[-1][0] if module_path(node) else '?'})"
            if (cos, sin) not in tables:
                try:
                    table_pos = torch.arange(length).unsqueeze(0)
                    full_cos, full_sin = evaluate(graph, [cos, sin], {positions: table_pos})
                except NeedsInput as missing:
                    notes.append(f"{where}: cos/sin depend on input {missing}, not positions only")
                    tables[(cos, sin)] = None
                    continue
                half = full_cos.shape[-1] // 2
                ok = full_cos.dim() == 3 and full_cos.shape[:2] == (1, length)
                ok = ok and torch.equal(full_cos[..., :half], full_cos[..., half:])
                ok = ok and torch.equal(full_sin[..., :half], full_sin[..., half:])
                if not ok:
                    notes.append(f"{where}: cos/sin tables are not [positions, D] halves")
                    tables[(cos, sin)] = None
                    continue
                tables[(cos, sin)] = (
                    graph.add_constant("rotary.cos", full_cos[0, :, :half].contiguous()),
                    graph.add_constant("rotary.sin", full_sin[0, :, :half].contiguous()),
                )
            if tables[(cos, sin)] is None:
                continue
            cos_t, sin_t = tables[(cos, sin)]
            heads, head_dim = x.meta["val"].shape[1], x.meta["val"].shape[3]
            with graph.fx.inserting_before(node):
                packed = graph.call(aten.transpose.int, (x, 1, 2), like=node)
                packed = graph.call(aten.flatten.using_ints, (packed, 2), like=node)
                rotated = graph.call(
                    torch.ops.llmc.rotary.default,
                    (packed, cos_t, sin_t, positions, False),
                    like=node,
                )
                out = graph.call(aten.unflatten.int, (rotated, -1, [heads, head_dim]), like=node)
                out = graph.call(aten.transpose.int, (out, 1, 2), like=node)
            node.replace_all_uses_with(out)
            erase_unused(graph, [node, *node.all_input_nodes])
            fused += 1
        # The model's cos/sin computation is dead once every use is fused.
        graph.fx.eliminate_dead_code()
        graph.drop_unused_tensors()
        if not matches:
            notes.append(
                "no x*cos + rotate_half(x)*sin pattern (no RoPE, or RoPE in another layout such "
                "as interleaved pairs)"
            )
        return PassReport(
            self.name,
            modified=fused > 0,
            counts={"fused": fused, "tables": sum(1 for t in tables.values() if t)},
            notes=notes,
        )
