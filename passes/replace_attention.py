"""Replace every attention call with one `llmc::attention` (a trace-time pass).

Before: q/k/v -> [repeat_kv] -> scores = q @ kᵀ * scale + mask -> softmax -> @ v, and a
        concat of past and new k/v in the cache layer; plus the mask construction
After:  out, present_k, present_v = llmc.attention(q, k, v, past_k, past_v, seq_info, ...)

Rewriting this subgraph after tracing would mean matching every model's mask code; at trace time
transformers' AttentionInterface hands each layer's q/k/v to one function instead (DESIGN.md).
The cache layer passes new k/v through and the op takes the layer's past by index, so no mask
or repeat-kv is traced at all. The report counts the ops per layer after tracing.
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport, Stage
from llmc.compiler.trace import ATTENTION_NAME, TraceOptions

_LEFTOVERS = (
    "aten.scaled_dot_product_attention.default",
    "aten._softmax.default",
    "aten.softmax.int",
)


class ReplaceAttention(Pass):
    name = "replace_attention"
    attention_only = True
    stage = Stage.TRACE

    def configure(self, options: TraceOptions, model: torch.nn.Module, ctx: PassContext) -> None:
        if getattr(model, "_supports_attention_backend", True) is False:
            ctx.note(self.name, "the model does not use AttentionInterface")
            return
        options.attention = ATTENTION_NAME

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        found = graph.count(torch.ops.llmc.attention.default)
        layers = graph.spec.num_layers
        notes = list(ctx.notes[self.name])
        if found < layers:
            notes.append(f"{layers - found} of {layers} layers still use the model's attention")
        histogram = graph.op_histogram()
        left = {op: histogram[op] for op in _LEFTOVERS if op in histogram}
        if left:
            notes.append(f"attention ops left in the graph: {left}")
        return PassReport(
            self.name,
            modified=found > 0,
            counts={"attention": found, "layers": layers},
            notes=notes,
        )
