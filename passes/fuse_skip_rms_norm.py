"""Fold the residual add before a norm into it.

Before: s = aten.add(residual, h) ; y = llmc.rms_norm(s, w, eps) ; ... s used by the next add
After:  y, s = llmc.skip_rms_norm(h, residual, w, eps)
A norm whose input is not an add of two same-shaped activations (the first layer's, fed by the
embedding) stays `rms_norm` and is reported.
"""

from __future__ import annotations

import torch

from llmc.compiler.graph import Graph, shape_str
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, erase_unused, is_call


class FuseSkipRmsNorm(Pass):
    name = "fuse_skip_rms_norm"
    requires = ("fuse_rms_norm",)

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        fused, notes = 0, []
        norms = [n for n in graph.fx.nodes if is_call(n, torch.ops.llmc.rms_norm.default)]
        for norm in norms:
            total, w, eps = norm.args
            if not is_call(total, aten.add.Tensor) or len(total.args) != 2 or total.kwargs:
                notes.append(f"{norm.name}: input is not a residual add ({total.name})")
                continue
            residual, h = total.args
            if not all(isinstance(a, torch.fx.Node) for a in (residual, h)) or not (
                shape_str(residual) == shape_str(h) == shape_str(total)
            ):
                notes.append(f"{norm.name}: the add broadcasts, no residual to fold")
                continue
            with graph.fx.inserting_before(norm):
                skip = graph.call(
                    torch.ops.llmc.skip_rms_norm.default, (h, residual, w, eps), like=norm
                )
                y, new_total = graph.getitems(skip, 2)
            norm.replace_all_uses_with(y)
            total.replace_all_uses_with(new_total)
            erase_unused(graph, [norm, total])
            fused += 1
        if not norms:
            notes.append("no llmc.rms_norm in the graph (run fuse_rms_norm first)")
        return PassReport.matches(self.name, fused, notes)
