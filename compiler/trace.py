"""Trace a causal LM to an ExportedProgram with explicit KV-cache inputs and outputs."""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from llmc.compiler.spec import ModelSpec
from llmc.contract import CacheGeometry, IOContract, KVMode

ATTENTION_NAME = "llmc"


@dataclass
class TraceOptions:
    """What trace-time passes asked for (they are passes all the same, with reports).

    attention: "model" keeps the model's own attention (concat KV through the cache layer);
    "llmc" routes every attention call to one `llmc::attention` op.
    kv_mode: KVMode.CONCAT (present = past ++ new) or KVMode.SHARED (a buffer per layer, written
    in place; needs llmc attention).
    logits_index: the graph takes `logits_index` (int64 [P]) and computes logits only at those
    positions of every row (transformers' `logits_to_keep` with a tensor): [S-1] when generating,
    every position when scoring a text.
    """

    attention: str = "model"
    kv_mode: KVMode = KVMode.CONCAT
    logits_index: bool = False  # a `logits_index` input picks the positions that get logits
    # a state-space model's positions per call (None: ssm_ops.SCAN_TOKENS; 1: a graph of one
    # position, static, for a target whose compiler cannot take the scan's symbolic shapes)
    recurrent_step: int | None = None

    def attention_impl(self, model: torch.nn.Module) -> str:
        if self.attention == ATTENTION_NAME:
            return ATTENTION_NAME
        return model.config._attn_implementation


class ExplicitKVLayer(DynamicLayer):
    """A cache layer seeded with given past tensors (never transformers' lazy empty tensors)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # [B, KVH, P, D]
        self.device = keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class PassThroughLayer(ExplicitKVLayer):
    """With llmc attention the op itself updates the cache: `update` hands back the new k/v."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


class _AttentionContext(threading.local):
    """The current trace's past tensors and sequence info, read by the llmc attention function."""

    active: dict | None = None


_CONTEXT = _AttentionContext()


def _llmc_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """transformers AttentionInterface entry: q/k/v [B, H, S, D] -> ([B, S, H, D], None)."""
    ctx = _CONTEXT.active
    if ctx is None:
        raise RuntimeError("llmc attention called outside an llmc trace")
    layer = module.layer_idx
    past_k, past_v = ctx["past"][layer]
    heads, head_dim = query.shape[1], query.shape[3]
    out, present_k, present_v = torch.ops.llmc.attention(
        query.transpose(1, 2).flatten(2),
        key.transpose(1, 2).flatten(2),
        value.transpose(1, 2).flatten(2),
        past_k,
        past_v,
        ctx["seq_info"],
        ctx["total"],
        float(scaling if scaling is not None else head_dim**-0.5),
        int(sliding_window or 0),
        float(softcap or 0.0),
        None,
        None,
        ctx["shared"],
    )
    ctx["present"][layer] = (present_k, present_v)
    return out.unflatten(-1, (heads, head_dim)), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    import llmc.compiler.ops  # noqa: F401  (registers the llmc ops)

    AttentionInterface.register(ATTENTION_NAME, _llmc_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str):
    """Switch the model's attention implementation for the duration of a trace, then restore it.
    No mask function is registered for "llmc": transformers then builds no mask at all."""
    previous = model.config._attn_implementation
    if name == ATTENTION_NAME:
        _register_attention()
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache` in some models: use what it takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class KVWrapper(torch.nn.Module):
    """forward(input_ids, position_ids, seq_info, [logits_index,] *past) -> (logits, *present).

    past/present are flattened per layer as key, value; each [batch, kv_heads, seq, head_dim].
    """

    def __init__(
        self, model: torch.nn.Module, spec: ModelSpec, options: TraceOptions | None = None
    ):
        super().__init__()
        self.model = model
        self.num_layers = spec.num_layers
        self.options = options or TraceOptions()
        self._cache_kwarg = cache_kwarg(model)

    def forward(self, input_ids, position_ids, seq_info, *rest):
        """seq_info: the attention mask [B, past+S] (concat) or seqlens_k [B] int32 (shared)."""
        opts = self.options
        keep, past = (rest[0], rest[1:]) if opts.logits_index else (0, rest)
        llmc = opts.attention == ATTENTION_NAME
        layer_cls = PassThroughLayer if llmc else ExplicitKVLayer
        layers = [layer_cls(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = Cache(layers=layers)
        shared = opts.kv_mode is KVMode.SHARED
        ctx = {
            "past": [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
            "seq_info": seq_info,
            # GroupQueryAttention's total_sequence_length, computed once for every layer
            "total": (seq_info.max() + 1).to(torch.int32) if shared else None,
            "shared": shared,
            "present": {},
        }
        _CONTEXT.active = ctx if llmc else None
        try:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=None if shared else seq_info,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kwarg: cache},
            )
        finally:
            _CONTEXT.active = None
        if llmc:
            present = [t for i in range(self.num_layers) for t in ctx["present"][i]]
        else:
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


@dataclass
class TraceResult:
    """The exported program and the I/O contract it was traced with."""

    program: torch.export.ExportedProgram
    io: IOContract


def io_contract(spec: ModelSpec, options: TraceOptions) -> IOContract:
    """The KV-cache contract (DESIGN.md) of a graph traced with `options` (a recurrent state's
    for a state-space model)."""
    if spec.recurrent is not None:
        from llmc.compiler import recurrent

        return recurrent.io_contract(spec, options.logits_index, options.recurrent_step)
    cache = CacheGeometry(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_context)
    return IOContract(cache, KVMode(options.kv_mode), logits_index=options.logits_index)


def example_inputs(
    spec: ModelSpec,
    batch: int = 2,
    seq: int = 3,
    past: int = 4,
    kv_mode: KVMode = KVMode.CONCAT,
    logits_index: bool = False,
):
    """Inputs for one chunked-prefill step: `seq` new tokens after `past` cached ones (logits for
    every position when the graph takes `logits_index`).

    In shared mode the KV buffers hold `past + seq + 2` positions (the tail is never read) and
    rows have different lengths, as they do in a batch."""
    if spec.recurrent is not None:
        from llmc.compiler import recurrent

        return recurrent.example_inputs(spec, batch, seq, logits_index)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    index = (torch.arange(seq),) if logits_index else ()
    if kv_mode is KVMode.SHARED:
        lengths = torch.tensor([past + seq - (row % 2) for row in range(batch)])
        pos = (lengths - seq).unsqueeze(1) + torch.arange(seq)
        capacity = past + seq + 2
        kv = [
            torch.randn(batch, spec.num_kv_heads, capacity, spec.head_dim, generator=g)
            for _ in range(2 * spec.num_layers)
        ]
        return (ids, pos, (lengths - 1).to(torch.int32), *index, *kv)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=g)
        for _ in range(2 * spec.num_layers)
    ]
    return (ids, pos, mask, *index, *kv)


def prefill_inputs(
    spec: ModelSpec, ids: torch.Tensor, kv_mode: KVMode, logits_index: bool
) -> tuple:
    """The inputs that prefill one row `ids` [S] on an empty cache, with logits for every
    position (calibration runs of the graph)."""
    if spec.recurrent is not None:
        from llmc.compiler import recurrent

        return recurrent.prefill_inputs(spec, ids, logits_index)
    s = len(ids)
    pos = torch.arange(s)[None]
    index = (torch.arange(s),) if logits_index else ()
    if kv_mode is KVMode.SHARED:
        capacity = max(s, 2)
        seq_info = torch.tensor([s - 1], dtype=torch.int32)
    else:
        capacity, seq_info = 0, torch.ones(1, s, dtype=torch.int64)
    kv = [
        torch.zeros(1, spec.num_kv_heads, capacity, spec.head_dim)
        for _ in range(2 * spec.num_layers)
    ]
    return (torch.as_tensor(ids)[None], pos, seq_info, *index, *kv)


def trace(
    model: torch.nn.Module, spec: ModelSpec, options: TraceOptions | None = None
) -> TraceResult:
    """torch.export (non-strict) with dynamic batch, sequence and past length: one graph serves
    prefill (past 0), chunked prefill and decode. Logits come for every position, or for those
    `logits_index` names (asked for by the `prune_lm_head` pass)."""
    from torch.export import Dim

    options = options or TraceOptions()
    if spec.recurrent is not None:  # a state-space model: its state, not a KV cache
        from llmc.compiler import recurrent

        return recurrent.trace(model, spec, options.logits_index, options.recurrent_step)
    wrapper = KVWrapper(model, spec, options=options).eval()
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq", min=1, max=spec.max_context)
    if options.kv_mode is KVMode.SHARED:
        capacity = Dim("capacity", min=2, max=spec.max_context)
        kv_shape = {0: batch, 2: capacity}
        seq_info = {0: batch}
    else:
        kv_shape = {0: batch, 2: Dim("past", min=0, max=spec.max_context)}
        seq_info = {0: batch, 1: Dim.AUTO}
    index = ({0: Dim("logits", min=1, max=spec.max_context)},) if options.logits_index else ()
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        seq_info,
        (*index, *[kv_shape] * (2 * spec.num_layers)),
    )
    example = example_inputs(spec, kv_mode=options.kv_mode, logits_index=options.logits_index)
    with torch.no_grad(), attention_implementation(model, options.attention_impl(model)):
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    return TraceResult(program, io_contract(spec, options))
