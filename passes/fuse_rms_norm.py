"""Fuse every RMSNorm module's subgraph into one `llmc::rms_norm`.

Before: h = x.pow(2).mean(-1, keepdim) ; r = rsqrt(h + eps) ; y = w * (x * r)   (any cast order;
        Gemma's y = (x * r) * (1 + w))
After:  y = llmc.rms_norm(x, w', eps)      with w' the weight expression folded to a tensor

Regions are the nodes of one module whose class name ends in "RMSNorm" (from torch.export's
module stack). A region must read one activation and one weight, produce one output and contain
rsqrt(mean + eps); then it is evaluated on a random input against the op before it is replaced,
so a norm of another shape (an offset, a different mean) is reported, never silently fused.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llmc.compiler.graph import Graph, module_path
from llmc.compiler.ops import rms_norm_ref
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, erase_unused, evaluate, is_call


def norm_regions(graph: Graph, suffix: str = "RMSNorm") -> dict[str, list[torch.fx.Node]]:
    """Nodes grouped by the innermost module whose class name ends with `suffix`."""
    regions: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        path = module_path(node)
        if path and path[-1][1].endswith(suffix):
            regions[path[-1][0]].append(node)
    return dict(regions)


class _NoMatch(Exception):
    pass


def _match(graph: Graph, nodes: list[torch.fx.Node]):
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise _NoMatch(f"{len(outputs)} outputs leave the module (expected 1)")
    externals = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    weights = [a for a in externals if graph.tensor(a) is not None]
    activations = [a for a in externals if graph.tensor(a) is None]
    if len(activations) != 1 or len(weights) != 1:
        raise _NoMatch(
            f"reads {len(activations)} activations and {len(weights)} weights (expected 1 and 1)"
        )
    (x,), (w,) = activations, weights
    rsqrt = [n for n in nodes if is_call(n, aten.rsqrt.default)]
    if len(rsqrt) != 1 or not is_call(rsqrt[0].args[0], aten.add.Tensor, aten.add.Scalar):
        raise _NoMatch("no rsqrt(mean(x²) + eps)")
    eps = rsqrt[0].args[0].args[1]
    if not isinstance(eps, float | int):
        raise _NoMatch("eps is not a constant")
    # The weight expression: nodes that depend on the weight only (Gemma's 1 + w, a cast).
    weight_only = {w}
    for n in nodes:
        if n.all_input_nodes and all(a in weight_only for a in n.all_input_nodes):
            weight_only.add(n)
    frontier = [n for n in weight_only if any(u not in weight_only for u in n.users)]
    if len(frontier) != 1:
        raise _NoMatch("the weight enters in more than one place")
    return x, w, frontier[0], float(eps), outputs[0]


class FuseRmsNorm(Pass):
    name = "fuse_rms_norm"

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        fused, notes = 0, []
        regions = norm_regions(graph)
        for path, nodes in regions.items():
            try:
                x, w, weight_expr, eps, out = _match(graph, nodes)
                if weight_expr is w:
                    weight = graph.tensor(w)
                else:  # Gemma's 1 + w, folded once here
                    weight = evaluate(graph, [weight_expr], {})[0]
                hidden = weight.shape[-1]
                probe = torch.randn(2, 3, hidden, generator=torch.Generator().manual_seed(0))
                got = evaluate(graph, [out], {x: probe.to(weight.dtype)})[0]
                want = rms_norm_ref(probe.to(weight.dtype), weight, eps)
                diff = (got - want).abs().max().item()
                if not diff <= 1e-5 * max(1.0, want.abs().max().item()):
                    raise _NoMatch(f"computes something else than RMSNorm (max |Δ| {diff:.2g})")
            except _NoMatch as reason:
                notes.append(f"{path}: {reason}")
                continue
            w_node = w if weight_expr is w else graph.add_constant(f"{path}.weight", weight)
            with graph.fx.inserting_before(out):
                node = graph.call(torch.ops.llmc.rms_norm.default, (x, w_node, eps), like=out)
            out.replace_all_uses_with(node)
            erase_unused(graph, nodes)
            fused += 1
        if not regions:
            notes.append("no module whose class name ends in RMSNorm")
        graph.drop_unused_tensors()
        return PassReport.matches(self.name, fused, notes)
