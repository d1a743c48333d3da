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


def state_geometry(spec: ModelSpec) -> StateGeometry:
    r = spec.recurrent
    return StateGeometry(
        spec.num_layers, r.channels, r.conv_kernel - 1, r.state_size, spec.max_context, SCAN_TOKENS
    )


def io_contract(spec: ModelSpec, logits_index: bool) -> IOContract:
    return IOContract(state_geometry(spec), KVMode.RECURRENT, logits_index=logits_index)


def _mixer_forward(mixer, hidden_states, cache=None, attention_mask=None, **kwargs):
    """transformers' MambaMixer.forward, with the state from the trace's context and the llmc ops
    for the convolution and the scan. hidden_states [B, S, H] -> [B, S, H]."""
    ctx = _CONTEXT.active
    if ctx is None:
        raise RuntimeError("the llmc Mamba mixer ran outside an llmc trace")
    layer = mixer.layer_idx
    conv_state, ssm_state = ctx["past"][layer]
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype) if attention_mask is not None else 1
    projected = mixer.in_proj(hidden_states * mask)  # [B, S, 2 * channels]
    x, gate = projected.chunk(2, dim=-1)
    weight = mixer.conv1d.weight.squeeze(1)  # [channels, kernel]
    bias = mixer.conv1d.bias if mixer.use_conv_bias else None
    x, conv_next = torch.ops.llmc.causal_conv1d(x * mask, conv_state, weight, bias)
    x = mixer.act(x) * mask
    rank, n = mixer.time_step_rank, mixer.ssm_state_size
    time_step, B, C = torch.split(mixer.x_proj(x), [rank, n, n], dim=-1)
    delta = F.softplus(mixer.dt_proj(time_step))  # [B, S, channels]
    A = -torch.exp(mixer.A_log.float())
    y, ssm_next = torch.ops.llmc.selective_scan(x, delta, A, B, C, mixer.D, gate, ssm_state)
    ctx["present"][layer] = (conv_next, ssm_next)
    return mixer.out_proj(y)


@contextlib.contextmanager
def llmc_mixers(model: torch.nn.Module):
    """Run every Mamba mixer of `model` through `_mixer_forward` for the duration of a trace."""
    import llmc.compiler.ops  # noqa: F401  (registers the llmc ops)

    mixers = [m for m in model.modules() if type(m).__name__ == "MambaMixer"]
    if not mixers:
        raise UnsupportedModelError(
            f"{model.config.model_type!r} has no Mamba mixers to trace with a recurrent state."
        )
    for m in mixers:
        m.forward = _mixer_forward.__get__(m)
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
    """One step of `seq` tokens on a random (live) state, the first row left-padded by one."""
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


def trace(model: torch.nn.Module, spec: ModelSpec, logits_index: bool):
    """torch.export (non-strict), dynamic batch and step length (up to SCAN_TOKENS positions a
    call: the scan's decomposition is exact up to there)."""
    from torch.export import Dim

    from llmc.compiler.trace import TraceResult

    wrapper = StateWrapper(model, spec, logits_index).eval()
    batch = Dim("batch", min=1, max=64)
    seq = Dim("seq", min=1, max=SCAN_TOKENS)
    index = ({0: Dim("logits", min=1, max=SCAN_TOKENS)},) if logits_index else ()
    states = [{0: batch}] * (2 * spec.num_layers)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, (*index, *states))
    example = example_inputs(spec, logits_index=logits_index)
    with torch.no_grad(), llmc_mixers(model):
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False)
    return TraceResult(program, io_contract(spec, logits_index))
