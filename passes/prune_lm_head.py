"""Compute logits for the last position only (generation graphs), and everything after the
last attention only for the positions those logits need.

Before: logits = lm_head(norm(h + mlp(...(o_proj(attention(...))))))    every position
After:  logits = lm_head(norm(h[:, -1:] + mlp(...(o_proj(attention(...)[:, -1:])))))

The slice is first put in front of the lm_head, then moved up through every op that works
position by position (linear, norms, elementwise ops, splits) as long as nothing else reads the
full-length value. On a 512-token prompt this skips 511 rows of the largest matmul of a small
model (for SmolLM2, vocab 49152 × hidden 576: a fifth of the prefill's arithmetic) and of the
last layer's o_proj and MLP. Scoring graphs (perplexity) keep every position: leave this pass
out of their pipeline.
"""

from __future__ import annotations

import operator

import torch

from llmc.compiler.graph import Graph, shape_str
from llmc.compiler.pass_manager import PassReport
from llmc.passes._util import aten, erase_unused, is_call

_MATMULS = (aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default)


def lm_head(graph: Graph) -> tuple[torch.fx.Node | None, str]:
    """The matmul that produces the logits output, walking back through elementwise tails
    (soft-capping, scaling, casts)."""
    output = next(n for n in graph.fx.nodes if n.op == "output")
    node = output.args[0][graph.output_names.index("logits")]
    for _ in range(8):
        if is_call(node, *_MATMULS):
            return node, ""
        inputs = node.all_input_nodes if isinstance(node, torch.fx.Node) else []
        if len(inputs) != 1:
            return None, f"logits come from {getattr(node, 'name', node)}, not one matmul"
        node = inputs[0]
    return None, "no matmul within 8 nodes of the logits"


class PruneLmHead:
    name = "prune_lm_head"

    def run(self, graph: Graph) -> PassReport:
        head, reason = lm_head(graph)
        if head is None:
            return PassReport(self.name, modified=False, counts={"pruned": 0}, notes=[reason])
        hidden = head.args[1] if head.target is aten.addmm.default else head.args[0]
        val = hidden.meta["val"]
        if val.dim() != 3:
            return PassReport(
                self.name,
                modified=False,
                counts={"pruned": 0},
                notes=[f"{head.name}: input is rank {val.dim()}, not [batch, seq, hidden]"],
            )
        if isinstance(val.shape[1], int) and val.shape[1] == 1:
            return PassReport(
                self.name,
                modified=False,
                counts={"pruned": 0},
                notes=[f"{head.name}: already computes one position"],
            )
        with graph.fx.inserting_before(head):
            last = graph.call(aten.slice.Tensor, (hidden, 1, -1, END), like=head)
        head.replace_input_with(hidden, last)
        _refresh(graph, head)
        moved = _sink(graph, last)
        graph.logits = "last"
        return PassReport(self.name, modified=True, counts={"pruned": 1, "ops_moved": moved})


END = 9223372036854775807
# Ops whose output at a position depends only on their inputs at that position (over dim 1).
_POSITIONWISE = {
    aten.linear.default,
    aten.add.Tensor,
    aten.mul.Tensor,
    aten.silu.default,
    aten.gelu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.split_with_sizes.default,
    aten.split.Tensor,
    aten.chunk.default,
    aten.layer_norm.default,
    torch.ops.llmc.rms_norm.default,
    torch.ops.llmc.skip_rms_norm.default,
}


def _is_last_slice(node) -> bool:
    return (
        is_call(node, aten.slice.Tensor)
        and tuple(node.args[1:4]) == (1, -1, END)
        and len(node.args) <= 4
    )


def _sink(graph: Graph, start: torch.fx.Node) -> int:
    """Move last-position slices above position-wise producers; return how many ops moved."""
    moved, todo = 0, [start]
    while todo:
        sl = todo.pop()
        if sl.graph is not graph.fx:
            continue
        x = sl.args[0]
        op = x.args[0] if is_call(x, operator.getitem) else x
        if not is_call(op, *_POSITIONWISE) or not _last_dim_only(op):
            continue
        outputs = [u for u in op.users] if op is not x else [x]
        users = [u for o in outputs for u in o.users]
        if op is not x and not all(is_call(o, operator.getitem) for o in outputs):
            continue
        if not all(_is_last_slice(u) for u in users):
            continue  # someone reads every position: stop here
        seq = shape_str(x).split(",")[1] if "," in shape_str(x) else None
        new_args = []
        with graph.fx.inserting_before(op):
            for a in op.args:
                if isinstance(a, torch.fx.Node) and _has_seq(a, seq):
                    a = graph.call(aten.slice.Tensor, (a, 1, -1, END), like=op)
                    todo.append(a)
                new_args.append(a)
            new = graph.call(op.target, new_args, op.kwargs, like=op)
            if op is x:
                replacements = {x: new}
            else:
                replacements = {
                    o: graph.call(operator.getitem, (new, o.args[1]), like=o) for o in outputs
                }
        for old, rep in replacements.items():
            for u in list(old.users):
                u.replace_all_uses_with(rep)
        erase_unused(graph, [*users, *outputs, op])
        moved += 1
    return moved


def _last_dim_only(op: torch.fx.Node) -> bool:
    """Splits and norms must work on the last dim (never across positions)."""
    if is_call(op, aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default):
        dim = op.args[2] if len(op.args) > 2 else op.kwargs.get("dim", 0)
        return dim in (-1, op.args[0].meta["val"].dim() - 1)
    if is_call(op, aten.layer_norm.default):
        return len(op.args[1]) == 1
    return True


def _has_seq(node: torch.fx.Node, seq: str | None) -> bool:
    """True if the value has the same sequence dim (dim 1) as the one being sliced."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2 or seq is None:
        return False
    return str(val.shape[1]).strip() == seq.strip()


def _refresh(graph: Graph, start: torch.fx.Node) -> None:
    """Recompute the fake values of `start` and everything downstream of it (their sequence
    dim is now 1)."""
    changed = {start}
    for node in list(graph.fx.nodes):
        if node.op == "call_function" and (node is start or changed & set(node.all_input_nodes)):
            graph.refresh(node)
            changed.add(node)
