"""Trace a state-space model (transformers' Mamba) with its recurrent state as explicit inputs
and outputs: forward(input_ids, attention_mask, [logits_index,] *past_state) ->
(logits, *present_state), conv then ssm state per layer (llmc/contract.py, `recurrent` mode).

transformers' own Mamba mixer loops over positions in Python (its slow path) and keeps its state
in a cache object, neither of which a static graph can hold. For the trace, each mixer runs
`_mixer_forward` instead: the same projections, with the convolution and the selective scan as
the llmc ops `causal_conv1d` and `selective_scan` (compiler/ssm_ops.py), reading and writing the
layer's state through the trace's context. Everything else (embeddings, norms, residuals, the
lm_head and `logits_to_keep`) is transformers' code, traced as it is.

The attention mask is the step's own ([B, S]: 0 on a row's left padding). Padded positions enter
the convolution and the scan as exact zeros, so a padded row's state stays the zeros it started
from and a left-padded batch computes what each row computes alone.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from llmc.compiler.spec import ModelSpec
from llmc.compiler.ssm_ops import SCAN_TOKENS
from llmc.contract import IOContract, KVMode, StateGeometry
from llmc.errors import UnsupportedModelError


class _StateContext(threading.local):
    active: dict | None = None


_CONTEXT = _StateContext()


def state_geometry(spec: ModelSpec, step_tokens: int | None = None) -> StateGeometry:
    r = spec.recurrent
    return StateGeometry(
        spec.num_layers,
        r.channels,
        r.conv_channels,
        r.conv_kernel - 1,
        r.state_size,
        spec.max_context,
        step_tokens or SCAN_TOKENS,
    )


def io_contract(spec: ModelSpec, logits_index: bool, step_tokens: int | None = None) -> IOContract:
    geometry = state_geometry(spec, step_tokens)
    return IOContract(geometry, KVMode.RECURRENT, logits_index=logits_index)


def _layer_state(mixer, dtype):
    """(conv state, ssm state, mask [B, S, 1]) of the mixer's layer in the current trace. The
    mask is the step's input, not what the model hands its layers: Mamba2's drops it for a
    single position (a static one-position graph would then lose it)."""
    ctx = _CONTEXT.active
    if ctx is None:
        raise RuntimeError("the llmc Mamba mixer ran outside an llmc trace")
    mask = ctx["mask"].unsqueeze(-1).to(dtype)
    return (*ctx["past"][mixer.layer_idx], mask)


def _convolve(mixer, x, conv_state, mask):
    """The causal convolution over x (its padding zeroed) with its state, then the activation."""
    weight = mixer.conv1d.weight.squeeze(1)  # [channels, kernel]
    bias = mixer.conv1d.bias if mixer.use_conv_bias else None
    x, conv_next = torch.ops.llmc.causal_conv1d(x * mask, conv_state, weight, bias)
    return mixer.act(x) * mask, conv_next


def _mixer_forward(mixer, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' MambaMixer.forward (and FalconMambaMixer's, whose Δ, B and C are normed),
    with the state from the trace's context and the llmc ops for the convolution and the scan.
    hidden_states [B, S, H] -> [B, S, H]."""
    conv_state, ssm_state, mask = _layer_state(mixer, hidden_states.dtype)
    projected = mixer.in_proj(hidden_states * mask)  # [B, S, 2 * channels]
    x, gate = projected.chunk(2, dim=-1)
    x, conv_next = _convolve(mixer, x, conv_state, mask)
    rank, n = mixer.time_step_rank, mixer.ssm_state_size
    time_step, B, C = torch.split(mixer.x_proj(x), [rank, n, n], dim=-1)
    if hasattr(mixer, "b_layernorm"):  # Falcon Mamba
        time_step = mixer.dt_layernorm(time_step)
        B, C = mixer.b_layernorm(B), mixer.c_layernorm(C)
    delta = F.softplus(mixer.dt_proj(time_step))  # [B, S, channels]
    A = -torch.exp(mixer.A_log.float())
    y, ssm_next = torch.ops.llmc.selective_scan(x, delta, A, B, C, mixer.D, gate, ssm_state)
    _CONTEXT.active["present"][mixer.layer_idx] = (conv_next, ssm_next)
    return mixer.out_proj(y)


def _mixer2_forward(mixer, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' Mamba2Mixer.forward on the same llmc ops. Mamba2's heads share one decay
    per head and its B and C come per group: each is spread over its channels (head_dim per
    head, heads / groups per group), which is the selective scan of the scan's channels
    (channels = heads x head_dim; the state [channels, state] is transformers' [heads,
    head_dim, state] in the same memory order). The gated RMSNorm after it is the model's."""
    conv_state, ssm_state, mask = _layer_state(mixer, hidden_states.dtype)
    d, heads, p = mixer.intermediate_size, mixer.num_heads, mixer.head_dim
    groups, n = mixer.n_groups, mixer.ssm_state_size
    gate, xbc, dt = mixer.in_proj(hidden_states * mask).split([d, mixer.conv_dim, heads], dim=-1)
    xbc, conv_next = _convolve(mixer, xbc, conv_state, mask)
    x, B, C = torch.split(xbc, [d, groups * n, groups * n], dim=-1)
    delta = F.softplus(dt + mixer.dt_bias)  # [B, S, heads]
    low, high = mixer.time_step_limit
    if low > 0.0 or high != float("inf"):
        delta = delta.clamp(low, high)
    delta = delta.repeat_interleave(p, dim=-1)  # [B, S, channels]
    A = (-torch.exp(mixer.A_log.float())).repeat_interleave(p).unsqueeze(-1).expand(d, n)
    if groups > 1:  # [B, S, channels, N]: each channel reads its group's B and C
        B = B.unflatten(-1, (groups, n)).repeat_interleave(d // groups, dim=2)
        C = C.unflatten(-1, (groups, n)).repeat_interleave(d // groups, dim=2)
    D = mixer.D.repeat_interleave(p)
    y, ssm_next = torch.ops.llmc.selective_scan(x, delta, A, B, C, D, None, ssm_state)
    _CONTEXT.active["present"][mixer.layer_idx] = (conv_next, ssm_next)
    return mixer.out_proj(mixer.norm(y, gate))


_MIXERS = {
    "MambaMixer": _mixer_forward,
    "FalconMambaMixer": _mixer_forward,
    "Mamba2Mixer": _mixer2_forward,
}


@contextlib.contextmanager
def llmc_mixers(model: torch.nn.Module):
    """Run every Mamba mixer of `model` through `_mixer_forward` for the duration of a trace."""
    import llmc.compiler.ops  # noqa: F401  (registers the llmc ops)

    mixers = [m for m in model.modules() if type(m).__name__ in _MIXERS]
    if not mixers:
        raise UnsupportedModelError(
            f"{model.config.model_type!r} has no Mamba mixers to trace with a recurrent state."
        )
    for m in mixers:
        m.forward = _MIXERS[type(m).__name__].__get__(m)
    try:
        yield len(mixers)
    finally:
        for m in mixers:
            del m.forward


class StateWrapper(torch.nn.Module):
    """forward(input_ids, attention_mask, [logits_index,] *past) -> (logits, *present)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, logits_index: bool):
        super().__init__()
        self.model, self.num_layers, self.logits_index = model, spec.num_layers, logits_index

    def forward(self, input_ids, attention_mask, *rest):
        keep, past = (rest[0], rest[1:]) if self.logits_index else (0, rest)
        ctx = {
            "past": [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
            "mask": attention_mask,
            "present": {},
        }
        _CONTEXT.active = ctx
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=keep,
            )
        finally:
            _CONTEXT.active = None
        present = [t for i in range(self.num_layers) for t in ctx["present"][i]]
        return (out.logits, *present)


def zero_states(spec: ModelSpec, rows: int) -> list[torch.Tensor]:
    return [torch.zeros(shape) for shape in state_geometry(spec).shapes(rows)]


def example_inputs(spec: ModelSpec, batch: int = 2, seq: int = 3, logits_index: bool = False):
    """One step of `seq` tokens on a random (live) state, every position unmasked."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    index = (torch.arange(seq),) if logits_index else ()
    states = [torch.randn(shape, generator=g) for shape in state_geometry(spec).shapes(batch)]
    return (ids, mask, *index, *states)


def prefill_inputs(spec: ModelSpec, ids: torch.Tensor, logits_index: bool) -> tuple:
    """One row `ids` [S] (at most step_tokens of them) on a zero state, logits everywhere."""
    s = len(ids)
    index = (torch.arange(s),) if logits_index else ()
    mask = torch.ones(1, s, dtype=torch.int64)
    return (torch.as_tensor(ids)[None], mask, *index, *zero_states(spec, 1))


def trace(model: torch.nn.Module, spec: ModelSpec, logits_index: bool, step: int | None = None):
    """torch.export (non-strict), dynamic batch and step length (up to SCAN_TOKENS positions a
    call: the scan's decomposition is exact up to there); `step` 1: one position a call, a
    static length (the scan is then the recurrence itself)."""
    from torch.export import Dim

    from llmc.compiler.trace import TraceResult

    step = step or SCAN_TOKENS
    wrapper = StateWrapper(model, spec, logits_index).eval()
    batch = Dim("batch", min=1, max=64)
    if step == 1:
        index, tokens = ({},) if logits_index else (), {0: batch}
    else:
        index = ({0: Dim("logits", min=1, max=step)},) if logits_index else ()
        tokens = {0: batch, 1: Dim("seq", min=1, max=step)}
    states = [{0: batch}] * (2 * spec.num_layers)
    dynamic = (tokens, tokens, (*index, *states))
    example = example_inputs(spec, seq=min(3, step), logits_index=logits_index)
    with torch.no_grad(), llmc_mixers(model):
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    return TraceResult(program, io_contract(spec, logits_index, step))
