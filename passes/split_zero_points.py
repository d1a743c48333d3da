"""Give every quantized linear integer zero points, moving the fractional part into an exact
low-rank correction (for kernels whose fast path takes uint8 zero points only).

Before: y = llmc.linear_nbits(x, q, s, z, bits, g, b)            z fractional (an exact source grid)
After:  y = llmc.linear_nbits(x, q, s, round(z), bits, g, b) + (x @ E) @ Rᵀ

E [K, K/g] sums each group of g input channels; R [N, K/g] = (round(z) - z) * s. The result is the
same number: (q - z)s = (q - round(z))s + (round(z) - z)s, and the second term is constant over a
group. The group sums are computed once per input and shared by the linears that read it. It costs
two small matmuls and an add per linear (K/g = 18 columns for a 576-wide input), instead of
onnxruntime's slow path for fractional zero points, which dequantizes the whole weight on every
call (about 20x slower for a decode step).
"""

from __future__ import annotations

import torch

from llmc.compiler import ops as _ops  # noqa: F401  (registers the llmc ops)
from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, is_call

_LINEAR_NBITS = torch.ops.llmc.linear_nbits.default


class SplitZeroPoints(Pass):
    name = "split_zero_points"
    requires = ("quantize_weights",)
    # exact in real arithmetic; in fp32 the two terms round differently from one dequantized
    # weight, which over 30 layers moves SmolLM2's logits by ~2e-5 of their scale
    tolerance = 1e-4

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        sums: dict = {}  # (input node, group) -> node of its group sums
        summers: dict = {}  # (K, group) -> constant node of E
        split = 0
        for node in [n for n in graph.fx.nodes if is_call(n, _LINEAR_NBITS)]:
            x, _, scales_node, zeros_node, bits, group = node.args[:6]
            zeros = graph.tensor(zeros_node) if zeros_node is not None else None
            scales = graph.tensor(scales_node)
            if zeros is None or scales is None or torch.equal(zeros, zeros.round()):
                continue
            whole = zeros.round().clamp(0, 2**bits - 1)
            residual = ((whole - zeros) * scales).contiguous()  # [N, G]
            n_groups = zeros.shape[1]
            k = n_groups * group
            node.update_arg(3, graph.add_constant(f"{zeros_node.name}_int", whole))
            if (k, group) not in summers:
                e = torch.zeros(n_groups, k)  # linear() takes [out, in]: E transposed
                e[torch.arange(k) // group, torch.arange(k)] = 1.0
                summers[(k, group)] = graph.add_constant(f"group_sum_{k}_{group}", e)
            if (x, group) not in sums:
                with graph.fx.inserting_after(x):
                    summer = summers[(k, group)]
                    sums[(x, group)] = graph.call(aten.linear.default, (x, summer), like=node)
            r = graph.add_constant(f"{zeros_node.name}_residual", residual)
            with graph.fx.inserting_after(node):
                corr = graph.call(aten.linear.default, (sums[(x, group)], r), like=node)
            with graph.fx.inserting_after(corr):
                total = graph.call(aten.add.Tensor, (node, corr), like=node)
            node.replace_all_uses_with(total, delete_user_cb=lambda u, t=total: u is not t)
            split += 1
        return PassReport(self.name, modified=split > 0, counts={"split": split})
