"""Trace a causal LM to an ExportedProgram with explicit KV-cache inputs and outputs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from llmc.compiler.spec import ModelSpec


class ExplicitKVLayer(DynamicLayer):
    """A cache layer seeded with given past tensors (never transformers' lazy empty tensors)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # [B, KVH, P, D]
        self.device = keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache` in some models: use what it takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class KVWrapper(torch.nn.Module):
    """forward(input_ids, position_ids, attention_mask, *past) -> (logits, *present).

    past/present are flattened per layer as key, value; each [batch, kv_heads, seq, head_dim].
    With `all_logits=False` only the last position's logits are computed (generation graphs).
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.num_layers = spec.num_layers
        self.all_logits = all_logits
        self._cache_kwarg = cache_kwarg(model)

    def forward(self, input_ids, position_ids, attention_mask, *past):
        layers = [ExplicitKVLayer(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = Cache(layers=layers)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=0 if self.all_logits else 1,
            **{self._cache_kwarg: cache},
        )
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


@dataclass
class TraceResult:
    """The exported program and the I/O names it was traced with."""

    program: torch.export.ExportedProgram
    input_names: list[str]
    output_names: list[str]


def io_names(spec: ModelSpec) -> tuple[list[str], list[str]]:
    """Input and output names of the KV-cache contract (DESIGN.md)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]


def example_inputs(spec: ModelSpec, batch: int = 2, seq: int = 3, past: int = 4):
    """Inputs for one chunked-prefill step: `seq` new tokens after `past` cached ones."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=g)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, pos, mask, *kv)


def trace(model: torch.nn.Module, spec: ModelSpec, all_logits: bool = False) -> TraceResult:
    """torch.export (non-strict) with dynamic batch, sequence and past length: one graph serves
    prefill (past 0), chunked prefill and decode."""
    from torch.export import Dim

    wrapper = KVWrapper(model, spec, all_logits=all_logits).eval()
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq", min=1, max=spec.max_context)
    past = Dim("past", min=0, max=spec.max_context)
    kv_shape = {0: batch, 2: past}
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},
        tuple([kv_shape] * (2 * spec.num_layers)),
    )
    with torch.no_grad():
        program = torch.export.export(
            wrapper, example_inputs(spec), dynamic_shapes=dynamic, strict=False
        )
    inputs, outputs = io_names(spec)
    return TraceResult(program, inputs, outputs)
