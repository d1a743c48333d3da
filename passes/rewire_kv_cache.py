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
from llmc.compiler.pass_manager import PassReport
from llmc.compiler.trace import ATTENTION_NAME, TraceOptions


class RewireKvCache:
    name = "rewire_kv_cache"
    stage = "trace"

    def __init__(self, mode: str = "shared"):
        if mode not in ("concat", "shared"):
            raise ValueError(f"unknown KV mode {mode!r}")
        self.mode = mode

    def configure(self, options: TraceOptions, model: torch.nn.Module) -> None:
        if self.mode == "shared" and options.attention != ATTENTION_NAME:
            options.notes.append(f"{self.name}: shared KV needs replace_attention; kept concat")
            return
        options.kv_mode = self.mode

    def run(self, graph: Graph) -> PassReport:
        notes = [n for n in graph.notes if n.startswith(self.name)]
        rewired = graph.kv_mode == self.mode and self.mode != "concat"
        layers = graph.count(torch.ops.llmc.attention.default) if rewired else 0
        return PassReport(
            self.name,
            modified=rewired,
            counts={"layers": layers},
            notes=[*notes, f"kv_mode={graph.kv_mode}"],
        )
