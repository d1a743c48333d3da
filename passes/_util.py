"""Helpers the pattern passes share: node predicates, evaluating a piece of the graph on real
tensors, and erasing what a rewrite left unused."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmc.compiler.graph import Graph

aten = torch.ops.aten


def is_call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def erase_unused(graph: Graph, nodes: Iterable[torch.fx.Node]) -> int:
    """Erase the given call nodes that nothing uses any more (latest first); return how many."""
    erased = 0
    for node in sorted(set(nodes), key=_order(graph), reverse=True):
        if node.op == "call_function" and not node.users and node.graph is graph.fx:
            graph.fx.erase_node(node)
            erased += 1
    return erased


def _order(graph: Graph):
    index = {n: i for i, n in enumerate(graph.fx.nodes)}
    return lambda n: index.get(n, -1)


def ancestors(outputs: Iterable[torch.fx.Node], stop: set | None = None) -> set[torch.fx.Node]:
    """Every node the outputs depend on (stopping at `stop`)."""
    seen, todo = set(), list(outputs)
    stop = stop or set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in stop:
            continue
        todo.extend(node.all_input_nodes)
    return seen


class NeedsInput(Exception):
    """The subgraph reads a graph input that was not given."""


def evaluate(
    graph: Graph, outputs: list[torch.fx.Node], feeds: dict[torch.fx.Node, torch.Tensor]
) -> list[torch.Tensor]:
    """Run the part of the graph that computes `outputs`, on real tensors: `feeds` replace the
    nodes they name; weights and constants take their values. Used to compute tables (cos/sin
    for every position) and to check a matched region against the op that replaces it."""
    needed = ancestors(outputs, stop=set(feeds))
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    values: list[torch.Tensor] = []
    for node in graph.fx.nodes:
        if node not in needed:
            continue
        if node in feeds or node.op == "placeholder":
            value = feeds.get(node)
            if value is None:
                value = graph.tensor(node)
            if value is None:
                raise NeedsInput(node.name)
            env[node] = sub.placeholder(f"in{len(values)}")
            values.append(value)
        else:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[o] for o in outputs))
    module = torch.fx.GraphModule(torch.nn.Module(), sub)
    with torch.no_grad():
        return list(module(*values))
