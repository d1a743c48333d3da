"""Graph: the traced program with the model spec and I/O names every pass and target sees, and
the few edits passes make to an ExportedProgram besides rewiring nodes (new nodes with their
fake values, new constant tensors, dropping weights nothing reads)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from llmc.compiler.spec import ModelSpec
from llmc.contract import IOContract, KVMode

_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class Graph:
    program: torch.export.ExportedProgram
    spec: ModelSpec
    input_names: list[str]  # the program's user inputs and outputs, in order
    output_names: list[str]
    io: IOContract | None = None  # a language model's I/O and KV-cache contract
    quantization: dict | None = None  # the recipe, set by quantize_weights

    @classmethod
    def from_trace(cls, traced, spec: ModelSpec) -> Graph:
        """The graph of a `trace()` result."""
        io = traced.io
        return cls(traced.program, spec, io.inputs, io.outputs, io)

    @property
    def kv_mode(self) -> KVMode:
        return self.io.kv_mode

    @property
    def fx(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def op_histogram(self) -> dict[str, int]:
        """Count call_function targets by name, e.g. {'aten.mm.default': 14}."""
        counts = Counter(str(node.target) for node in self.fx.nodes if node.op == "call_function")
        return dict(sorted(counts.items()))

    def count(self, target) -> int:
        return sum(1 for n in self.fx.nodes if n.op == "call_function" and n.target == target)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.program.module()(*inputs))

    def example_inputs(self, batch: int = 1, seq: int = 3, past: int = 2):
        from llmc.compiler.trace import example_inputs

        if self.io.recurrent:  # a recurrent graph takes at most step_tokens positions a call
            seq = min(seq, self.io.cache.step_tokens)
        return example_inputs(
            self.spec,
            batch=batch,
            seq=seq,
            past=past,
            kv_mode=self.kv_mode,
            logits_index=self.io.logits_index,
        )

    # -- lifted tensors (weights, buffers, constants) --------------------------------------------
    def tensor(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The value of a placeholder that holds a weight, buffer or constant; else None."""
        if node.op != "placeholder":
            return None
        for spec in self.program.graph_signature.input_specs:
            if spec.arg.name == node.name and spec.kind in _LIFTED:
                # non-persistent buffers live with the constants, not in the state dict
                value = self.program.state_dict.get(spec.target)
                return value if value is not None else self.program.constants.get(spec.target)
        return None

    def add_constant(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        """A new lifted constant tensor (e.g. a concatenated weight or a cos table)."""
        existing = {spec.target for spec in self.program.graph_signature.input_specs}
        base, i = name.replace(".", "_"), 0
        target = base
        while target in existing or target in self.program.constants:
            i += 1
            target = f"{base}_{i}"
        first_user_input = self._user_inputs()[0]
        with self.fx.inserting_before(first_user_input):
            node = self.fx.placeholder(target)
        node.meta["val"] = self.fake_mode().from_tensor(value, static_shapes=True)
        specs = self.program.graph_signature.input_specs
        index = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
        specs.insert(
            index, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(node.name), target, None)
        )
        self.program.constants[target] = value.detach().contiguous()
        return node

    def drop_unused_tensors(self) -> int:
        """Remove weights, buffers and constants no node reads any more; return how many."""
        specs = self.program.graph_signature.input_specs
        unused = {
            n.name
            for n, spec in zip(self._placeholders(), specs, strict=True)
            if spec.kind in _LIFTED and not n.users
        }
        for node in list(self._placeholders()):
            if node.name in unused:
                self.fx.erase_node(node)
        for spec in [s for s in specs if s.arg.name in unused]:
            specs.remove(spec)
            self.program.constants.pop(spec.target, None)
            self.program.state_dict.pop(spec.target, None)
        return len(unused)

    def user_input(self, name: str) -> torch.fx.Node:
        """The placeholder of the user input called `name` (from input_names)."""
        return self._user_inputs()[self.input_names.index(name)]

    def _user_inputs(self) -> list[torch.fx.Node]:
        specs = self.program.graph_signature.input_specs
        pairs = zip(self._placeholders(), specs, strict=True)
        return [n for n, s in pairs if s.kind == InputKind.USER_INPUT]

    def _placeholders(self) -> list[torch.fx.Node]:
        return [n for n in self.fx.nodes if n.op == "placeholder"]

    # -- new nodes -------------------------------------------------------------------------------
    def fake_mode(self):
        from torch._guards import detect_fake_mode

        return detect_fake_mode([n.meta["val"] for n in self._placeholders() if "val" in n.meta])

    def call(
        self, target: Callable, args: Iterable, kwargs: dict | None = None, like=None
    ) -> torch.fx.Node:
        """Insert `target(*args)` at the current insertion point, with its fake value computed
        (later passes and the exporters read shapes and dtypes from it). `like` lends its
        module-stack metadata, so the node still belongs to its layer."""
        node = self.fx.call_function(target, tuple(args), dict(kwargs or {}))
        self.refresh(node)
        if like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        return node

    def refresh(self, node: torch.fx.Node) -> None:
        """Recompute a call node's fake value from its inputs' fake values."""

        def fake(a):
            return a.meta["val"] if isinstance(a, torch.fx.Node) else a

        args = torch.fx.node.map_aggregate(node.args, fake)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
        with self.fake_mode():
            node.meta["val"] = node.target(*args, **kwargs)

    def getitems(self, node: torch.fx.Node, n: int) -> list[torch.fx.Node]:
        import operator

        return [self.call(operator.getitem, (node, i), like=node) for i in range(n)]


def shape_str(node) -> str:
    """A node's shape as text (symbolic sizes by name): comparable without guarding on them."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) else "?"


def module_path(node: torch.fx.Node) -> list[tuple[str, str]]:
    """The node's module stack, outermost first: [(qualified name, class name), ...]."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out
