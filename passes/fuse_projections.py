"""Concatenate sibling projections that read the same input into one matmul.

Before: q = linear(x, Wq, bq) ; k = linear(x, Wk, bk) ; v = linear(x, Wv, bv)
After:  q, k, v = split(linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv)), [nq, nk, nv], -1)

`fuse_qkv` does this inside attention modules, `fuse_gate_up` inside MLPs. One wider matmul
reads the input once and keeps the cores busy on small decode steps. The old weights are dropped.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llmc.compiler.graph import Graph, module_path
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._util import aten, erase_unused, is_call


class _FuseSiblings(Pass):
    name = ""
    parent_kind = ""  # substring of the parent module's class name
    wanted = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        groups: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
        parents = set()
        for node in graph.fx.nodes:
            path = module_path(node)
            if len(path) < 2 or self.parent_kind not in path[-2][1]:
                continue
            parents.add(path[-2][0])
            if is_call(node, aten.linear.default):
                groups[(node.args[0], path[-2][0])].append(node)
        fused, notes, done = 0, [], set()
        for (x, parent), linears in groups.items():
            if len(linears) < 2:
                continue
            weights = [graph.tensor(n.args[1]) for n in linears]
            biases = [n.args[2] if len(n.args) > 2 else None for n in linears]
            bias_values = [graph.tensor(b) if b is not None else None for b in biases]
            done.add(parent)  # reported below only if none of its groups could fuse
            if any(w is None for w in weights):
                notes.append(f"{parent}: a projection weight is computed, not stored")
                continue
            if any(b is not None and v is None for b, v in zip(biases, bias_values, strict=True)):
                notes.append(f"{parent}: a projection bias is computed, not stored")
                continue
            if len({w.shape[1] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
                notes.append(f"{parent}: projections differ in input size or dtype")
                continue
            weight = torch.cat(weights, 0)
            bias = None
            if any(v is not None for v in bias_values):
                bias = torch.cat(
                    [
                        v if v is not None else w.new_zeros(w.shape[0])
                        for v, w in zip(bias_values, weights, strict=True)
                    ]
                )
            first = linears[0]  # groups are filled in graph order
            names = "_".join(module_path(n)[-1][0].rsplit(".", 1)[-1] for n in linears)
            w_node = graph.add_constant(f"{parent}.{names}.weight", weight)
            b_node = None
            if bias is not None:
                b_node = graph.add_constant(f"{parent}.{names}.bias", bias)
            sizes = [w.shape[0] for w in weights]
            with graph.fx.inserting_before(first):
                args = (x, w_node) if b_node is None else (x, w_node, b_node)
                joint = graph.call(aten.linear.default, args, like=first)
                parts = graph.call(aten.split_with_sizes.default, (joint, sizes, -1), like=first)
                outs = graph.getitems(parts, len(sizes))
            for linear, out in zip(linears, outs, strict=True):
                linear.replace_all_uses_with(out)
            erase_unused(graph, linears)
            fused += 1
        if not parents:
            notes.append(f"no module whose class name contains {self.parent_kind!r}")
        with_linears = {parent for _, parent in groups}
        for parent in sorted(parents - done):
            if parent in with_linears:
                notes.append(f"{parent}: no two projections read the same input (already fused)")
            else:
                notes.append(f"{parent}: projections are not linear ops (already one matmul)")
        graph.drop_unused_tensors()
        return PassReport.matches(self.name, fused, notes)


class FuseQkv(_FuseSiblings):
    name = "fuse_qkv"
    attention_only = True
    parent_kind = "Attention"


class FuseGateUp(_FuseSiblings):
    name = "fuse_gate_up"
    parent_kind = "MLP"
