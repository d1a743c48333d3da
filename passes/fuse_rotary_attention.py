"""Move RoPE into the attention op when both q and k get the same tables (shared KV mode).

Before: out = llmc.attention(llmc.rotary(q, cos, sin, pos), llmc.rotary(k, cos, sin, pos), v, ...)
After:  out = llmc.attention(q, k, v, ..., cos, sin)

In shared mode a token's position is its cache index (seqlens_k based), which is what fused
kernels such as onnxruntime's GroupQueryAttention(do_rotary=1) use; it saves two ops per layer.
In concat mode positions and cache indices can differ (left padding), so nothing is fused.
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.op_args import AttentionCall
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.contract import KVMode
from llmc.passes._util import erase_unused, is_call

ROTARY = torch.ops.llmc.rotary.default
ATTENTION = torch.ops.llmc.attention.default


class FuseRotaryAttention(Pass):
    name = "fuse_rotary_attention"
    attention_only = True
    requires = ("replace_attention", "fuse_rotary")  # and shared KV, or it declines

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        fused, notes = 0, []
        attentions = [n for n in graph.fx.nodes if is_call(n, ATTENTION)]
        if graph.kv_mode is not KVMode.SHARED:
            notes.append(f"kv_mode is {graph.kv_mode.value}: positions are not cache indices")
            attentions = []
        positions = graph.user_input("position_ids") if attentions else None
        for node in attentions:
            call = AttentionCall.from_node(node)
            q, k = call.q, call.k  # rotary(x, cos, sin, positions, interleaved) each
            if not (is_call(q, ROTARY) and is_call(k, ROTARY)):
                notes.append(self.fail("q and k are not both rotated", node))
                continue
            if q.args[1:] != k.args[1:] or q.args[3] is not positions or q.args[4]:
                notes.append(self.fail("q and k use different tables or positions", node))
                continue
            if call.rotary_inside:
                notes.append(self.fail("already has rotary tables", node))
                continue
            call.q, call.k, call.cos, call.sin = q.args[0], k.args[0], q.args[1], q.args[2]
            call.write()
            erase_unused(graph, [q, k])
            fused += 1
        return PassReport.matches(self.name, fused, notes)
