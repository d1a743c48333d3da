"""Named views of llmc op calls in an FX graph, so passes read and rewrite arguments by name
rather than by position (llmc::attention has thirteen)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionCall:
    """The arguments of one `llmc::attention` node, in the op's schema order (compiler/ops.py).

    q [B, S, H*D], or the packed [q | k | v] when k and v are None; k, v [B, S, KVH*D];
    past_k/past_v the layer's cache; seq_info the attention mask (concat) or seqlens_k (shared);
    total GroupQueryAttention's total length; scale, window (0: none), softcap (0: none);
    cos/sin the rotary tables when RoPE is applied inside the op; shared the KV mode."""

    node: torch.fx.Node = dataclasses.field(repr=False)
    q: Any
    k: Any
    v: Any
    past_k: Any
    past_v: Any
    seq_info: Any
    total: Any
    scale: float
    window: int
    softcap: float
    cos: Any
    sin: Any
    shared: bool

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> AttentionCall:
        if node.target is not torch.ops.llmc.attention.default:
            raise ValueError(f"{node.name} is {node.target}, not llmc::attention")
        return cls(node, *node.args)

    @property
    def rotary_inside(self) -> bool:
        return self.cos is not None

    def write(self) -> None:
        """Put the (changed) arguments back on the node."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "node"]
        self.node.args = tuple(getattr(self, n) for n in names)
