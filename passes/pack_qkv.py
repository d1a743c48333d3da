"""Hand the fused QKV projection to attention packed, instead of split in three.

Before: q, k, v = split(linear(x, Wqkv), [Hd, KVd, KVd], -1)     (or three slices of it)
        out = llmc.attention(q, k, v, ...)
After:  out = llmc.attention(linear(x, Wqkv), None, None, ...)

onnxruntime's GroupQueryAttention reads a packed [q | k | v] query; the Split it saves is one
kernel launch and one copy per layer on every decode step.
"""

from __future__ import annotations

import operator

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.op_args import AttentionCall
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, erase_unused, is_call

ATTENTION = torch.ops.llmc.attention.default


def _sliced_source(q, k, v, kv_width: int):
    """Phi-3's form: q, k, v = qkv[..., :Hd], qkv[..., Hd:Hd+KVd], qkv[..., Hd+KVd:]."""
    items = (q, k, v)
    if not all(is_call(n, aten.slice.Tensor) for n in items):
        return None
    source = q.args[0]
    if any(n.args[0] is not source for n in items):
        return None
    width = source.meta["val"].shape[-1]
    if not isinstance(width, int) or any(n.args[1] not in (-1, 2) for n in items):
        return None
    hd = width - 2 * kv_width
    bounds = [tuple(n.args[2:4]) for n in items]
    ends_ok = bounds[2][1] >= width
    if bounds[:2] != [(0, hd), (hd, hd + kv_width)] or bounds[2][0] != hd + kv_width or not ends_ok:
        return None
    return source


def _packed_source(q, k, v, kv_width: int):
    items = (q, k, v)
    if not all(is_call(n, operator.getitem) for n in items):
        return None
    split = q.args[0]
    if any(n.args[0] is not split for n in items) or [n.args[1] for n in items] != [0, 1, 2]:
        return None
    if not is_call(split, aten.split_with_sizes.default) or split.args[2] not in (-1, 2):
        return None
    if list(split.args[1][1:]) != [kv_width, kv_width]:
        return None
    return split.args[0]


class PackQkv(Pass):
    name = "pack_qkv"
    attention_only = True
    requires = ("replace_attention", "fuse_qkv")  # and RoPE inside attention, or it declines

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        packed, notes = 0, []
        for node in [n for n in graph.fx.nodes if is_call(n, ATTENTION)]:
            call = AttentionCall.from_node(node)
            q, k, v = call.q, call.k, call.v
            if k is None:
                continue
            if not call.rotary_inside:
                notes.append(self.fail("rotary is not inside attention; q and k stay apart", node))
                continue
            past = call.past_k.meta["val"].shape  # [B, KVH, P, D]
            kv_width = past[1] * past[3]
            source = _packed_source(q, k, v, kv_width) or _sliced_source(q, k, v, kv_width)
            if source is None:
                notes.append(self.fail("q, k, v are not the three parts of one projection", node))
                continue
            call.q, call.k, call.v = source, None, None
            call.write()
            erase_unused(graph, [q, k, v, q.args[0]])
            packed += 1
        return PassReport.matches(self.name, packed, notes, key="packed")
