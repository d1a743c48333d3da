"""KV-cache mode: concat (present = past ++ new) or shared buffer (a trace-time pass).

concat: past [B, KVH, P, D] in, present [B, KVH, P+S, D] out; the runtime feeds present back
        next step (a full copy of the cache per token).
shared: one buffer per layer, [B, KVH, capacity, D], bound as both past and present; each step
        writes its new k/v in place at the row's position (`seqlens_k`, int32 [B], is the
        row's length - 1 after the step). No copy per step, and rows of a batch may have
        different lengths without padding in the cache.
The graph's input `attention_mask` becomes `seqlens_k`. Needs `replace_attention` (the
`llmc::attention` op owns the cache update).
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport, Stage
from llmc.compiler.trace import ATTENTION_NAME, TraceOptions
from llmc.contract import KVMode


class RewireKvCache(Pass):
    name = "rewire_kv_cache"
    attention_only = True
    requires = ("replace_attention",)
    stage = Stage.TRACE

    def __init__(self, mode: KVMode = KVMode.SHARED):
        if mode not in (KVMode.CONCAT, KVMode.SHARED):
            raise ValueError(f"a traced graph's KV mode is concat or shared, not {mode!r}")
        self.mode = KVMode(mode)

    def configure(self, options: TraceOptions, model: torch.nn.Module, ctx: PassContext) -> None:
        if self.mode is KVMode.SHARED and options.attention != ATTENTION_NAME:
            ctx.note(self.name, "shared KV needs replace_attention; kept concat")
            return
        options.kv_mode = self.mode

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        notes = list(ctx.notes[self.name])
        rewired = graph.kv_mode is self.mode is not KVMode.CONCAT
        layers = graph.count(torch.ops.llmc.attention.default) if rewired else 0
        return PassReport(
            self.name,
            modified=rewired,
            counts={"layers": layers},
            notes=[*notes, f"kv_mode={graph.kv_mode.value}"],
        )
