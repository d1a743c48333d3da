"""Compute logits only at the positions a `logits_index` input names, and everything after the
last attention only for those positions.

Before: logits = lm_head(norm(h + mlp(...(o_proj(attention(...)))))[:, logits_index])
After:  logits = lm_head(norm(h[:, i] + mlp(...(o_proj(attention(...)[:, i])))))   i = logits_index

At trace time the pass asks for a `logits_index` input (int64 [P]), which transformers'
`logits_to_keep` applies in front of the lm_head. The selection is then moved up through every op
that works position by position (linear, norms, elementwise ops, splits) as long as nothing else
reads the full-length value. Generating, the runtime passes [S-1]: on a 512-token prompt this skips
511 rows of the largest matmul of a small model (for SmolLM2, vocab 49152 × hidden 576: a fifth of
the prefill's arithmetic) and of the last layer's o_proj and MLP. Scoring a text (perplexity), it
passes every position, so one artifact serves both.
"""

from __future__ import annotations

import operator

import torch

from llmc.compiler.graph import Graph, shape_str
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.compiler.trace import TraceOptions
from llmc.contract import Logits
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


class PruneLmHead(Pass):
    name = "prune_lm_head"

    def configure(self, options: TraceOptions, model: torch.nn.Module, ctx: PassContext) -> None:
        options.logits_index = True

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        head, reason = lm_head(graph)
        if head is None:
            return self._skip(reason)
        if "logits_index" not in graph.input_names:
            return self._skip("the graph has no logits_index input (traced without this pass)")
        hidden = head.args[1] if head.target is aten.addmm.default else head.args[0]
        index = graph.user_input("logits_index")
        reason = _not_selected(hidden, index)
        if reason:
            return self._skip(f"{head.name}: {reason}")
        with graph.fx.inserting_before(hidden):  # h[:, index] -> index_select(h, 1, index)
            chosen = graph.call(aten.index_select.default, (hidden.args[0], 1, index), like=hidden)
        hidden.replace_all_uses_with(chosen)
        erase_unused(graph, [hidden])
        moved = _sink(graph, chosen)
        graph.io = graph.io.with_logits(Logits.SELECTED)
        return PassReport(self.name, modified=True, counts={"pruned": 1, "ops_moved": moved})

    def _skip(self, reason: str) -> PassReport:
        return PassReport(self.name, modified=False, counts={"pruned": 0}, notes=[reason])


def _not_selected(hidden: torch.fx.Node, index: torch.fx.Node) -> str:
    """Why the lm_head's input is not `h[:, logits_index]` as traced ("" if it is)."""
    if is_call(hidden, aten.index.Tensor) and list(hidden.args[1]) == [None, index]:
        return ""
    if is_call(hidden, aten.index_select.default):
        return "its input is already selected by logits_index"
    return f"its input {hidden.name} is not selected by logits_index"


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


def _is_selection(node, index) -> bool:
    return is_call(node, aten.index_select.default) and tuple(node.args[1:]) == (1, index)


def _sink(graph: Graph, start: torch.fx.Node) -> int:
    """Move position selections above position-wise producers; return how many ops moved."""
    index = start.args[2]
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
        if not all(_is_selection(u, index) for u in users):
            continue  # someone reads every position: stop here
        seq = shape_str(x).split(",")[1] if "," in shape_str(x) else None
        new_args = []
        with graph.fx.inserting_before(op):
            for a in op.args:
                if isinstance(a, torch.fx.Node) and _has_seq(a, seq):
                    a = graph.call(aten.index_select.default, (a, 1, index), like=op)
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
