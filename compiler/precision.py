"""Which quantized matmul causes how much drift, and a per-layer precision plan that meets a
perplexity budget at the best decode speed (the quantize_weights pass calls both).

Drift attribution: the graph (fp32 weights) runs on calibration tokens once as the reference, then
once per quantized matmul with only that matmul's weight replaced by its dequantized form; the
matmul's drift is the mean KL divergence KL(reference || perturbed) of the next-token distributions
over those tokens. The relative output error on the calibration inputs (`quantize.output_error`,
free to compute) is recorded beside it with their rank correlation: the proxy orders layers only
roughly (Spearman 0.57-0.60 over SmolLM2's 210 projections), which is why the KL itself is measured.

Forms a 4-bit matmul can take in a plan:
- `fast`: 4-bit symmetric (no zero points), GPTQ where calibration inputs exist (else RTN; the one
  with the smaller output error). onnxruntime's int8-activation MatMulNBits and OpenVINO's
  dynamic quantization run it at full speed: on SmolLM2 an all-`fast` graph decodes at 0.93x
  onnxruntime-genai's int4 against 0.86x with integer zero points.
- `exact`: the source's own 4-bit grid where every group lies on one (a GGUF Q4_1 source): no error,
  but fractional zero points (split_zero_points adds a correction per matmul on ONNX).
- `int8`: 8-bit symmetric, one scale per INT8_GROUP channels: near-exact, twice the bytes of 4
  bits.
The plan starts all `fast` and promotes matmuls in order of drift removed per unit of decode cost,
and measures the perplexity on the calibration text through the graph to find the fewest
promotions within the budget (a binary search over that order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmc.compiler import quantize as Q

# Decode time a form adds over `fast`, per weight, in relative units. Measured on SmolLM2 int4
# builds (bench_decode.py, onnx, 2026-12-02, each in one run with onnxruntime-genai's int4):
# all-fast 0.93x, all-int8 0.78x, all-exact 0.71x of its decode rate: 0.21 and 0.33 of its step.
EXTRA_COST = {"fast": 0.0, "int8": 1.0, "exact": 1.6}
# Input channels per scale of a plan's 8-bit form (and of a planned build's 8-bit embedding, so
# that a tied table stays one copy) where the 4-bit group is smaller and divides it: onnxruntime's
# 8-bit MatMulNBits scales its int8 dot products once per block, and a 3% plan of SmolLM2 with
# its 76 8-bit matmuls at 64 instead of 32 decoded 2.5-5.5% faster (paired, one process); an
# 8-bit weight's error at 64 is still about 1% of a 4-bit one's.
INT8_GROUP = 64
# Calibration tokens the plan's search scores each candidate plan on (about 7 s each on SmolLM2
# here; all 8,192 of the default calibration took 4.8 minutes for the whole search).
PLAN_TOKENS = 2048
KL_DIGITS = 4  # significant digits kept in the manifest (thread-count noise stays out of it)


def held_out(rows: list, tokens: int) -> tuple[list, list]:
    """Calibration rows split into (the plan's, GPTQ's): the first rows holding `tokens` tokens
    score the plans and GPTQ fits its weights on the rest, where the rest holds at least three
    times as many (else both get every row). Scored on the rows it was fitted to, a plan looked
    better than it was, the more so the more of its matmuls GPTQ made (SmolLM2 at a 3% budget:
    +1.6% on the calibration rows, +4.1% on held-out text)."""
    taken, kept = 0, 0
    for row in rows:
        if taken >= tokens:
            break
        taken, kept = taken + len(row), kept + 1
    rest = sum(len(r) for r in rows[kept:])
    return (rows[:kept], rows[kept:]) if kept and rest >= 3 * tokens else (rows, rows)


def int8_group(k: int, group: int) -> int:
    """The group of a planned 8-bit form of a weight with `k` input channels (INT8_GROUP)."""
    return INT8_GROUP if 0 < group < INT8_GROUP and k % INT8_GROUP == 0 else group


@dataclass
class Unit:
    """One quantized matmul and the forms it may take."""

    node: torch.fx.Node
    name: str
    weight: torch.Tensor  # [N, K] fp32
    feed: torch.fx.Node  # the placeholder that holds the weight
    transposed: bool  # stored [K, N] (a Conv1D's addmm)
    forms: dict[str, Q.Quantized] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # relative output error (proxy)
    kl: dict[str, float] = field(default_factory=dict)  # measured or estimated drift

    def value(self, form: str) -> torch.Tensor:
        """The dequantized weight of `form`, laid out as stored."""
        w = self.forms[form].dequantize()
        return w.T.contiguous() if self.transposed else w

    def gain(self, form: str) -> float:
        """Drift removed per unit of decode cost by promoting this matmul to `form`."""
        return (self.kl["fast"] - self.kl[form]) / (EXTRA_COST[form] * self.weight.numel())

    @property
    def alternative(self) -> str:
        """The form a promotion gives: the one (the source's exact grid, or 8 bits) that removes
        the most drift per unit of decode cost."""
        return max((f for f in self.forms if f != "fast"), key=self.gain)

    def best_gain(self) -> float:
        return self.gain(self.alternative)


class Probe:
    """The graph run on calibration rows, with chosen weights replaced."""

    def __init__(self, graph, rows: list[torch.Tensor], tokens: int | None):
        from llmc.compiler.trace import prefill_inputs

        self.graph = graph
        out = graph.fx.output_node().args[0]
        self.logits = out[graph.output_names.index("logits")]
        self.rows, left = [], tokens
        for ids in rows:
            if left is not None and left <= 1:
                break
            ids = ids if left is None else ids[:left]
            left = None if left is None else left - len(ids)
            values = prefill_inputs(graph.spec, ids, graph.kv_mode, graph.io.logits_index)
            names = graph.input_names
            feeds = {graph.user_input(n): v for n, v in zip(names, values, strict=True)}
            self.rows.append((ids, feeds))
        self.tokens = sum(len(ids) for ids, _ in self.rows)
        self._reference: list[torch.Tensor] | None = None

    def logprobs(self, replaced: dict) -> list[torch.Tensor]:
        from llmc.passes._util import evaluate

        return [
            torch.log_softmax(evaluate(self.graph, [self.logits], {**feeds, **replaced})[0][0], -1)
            for _, feeds in self.rows
        ]

    def kl(self, replaced: dict) -> float:
        """Mean KL(reference || replaced) of the next-token distributions."""
        if self._reference is None:
            self._reference = self.logprobs({})
        total = 0.0
        for ref, new in zip(self._reference, self.logprobs(replaced), strict=True):
            total += float((ref.exp() * (ref - new)).sum(-1).sum())
        return max(0.0, total / self.tokens)

    def nll(self, replaced: dict) -> float:
        """Mean negative log-likelihood of each row's next tokens."""
        total, count = 0.0, 0
        for (ids, _), lp in zip(self.rows, self.logprobs(replaced), strict=True):
            total -= float(lp[:-1].gather(1, ids[1:, None]).sum())
            count += len(ids) - 1
        return total / max(1, count)


def attribute(units: list[Unit], form_of: Callable[[Unit], str], probe: Probe) -> None:
    """Measure each unit's drift with only its weight replaced by its `form_of(unit)` form."""
    for unit in units:
        form = form_of(unit)
        unit.kl[form] = probe.kl({unit.feed: unit.value(form)})


def estimate_alternatives(units: list[Unit]) -> None:
    """The drift of each unit's promoted form, from its measured `fast` drift scaled by their
    output errors (second order: the KL grows with the square of the output change, and the
    error is already squared); exact grids drift by nothing."""
    for u in units:
        for form in u.forms:
            ratio = u.errors[form] / u.errors["fast"] if u.errors["fast"] > 0 else 0.0
            u.kl.setdefault(form, u.kl["fast"] * ratio)


BIG = 0.1  # a unit holding this share of the weights (an lm_head) is also tried promoted first


def plan(units: list[Unit], probe: Probe, target: float) -> tuple[dict[str, str], dict]:
    """The cheapest promotions found whose calibration perplexity is within `target` (a fraction)
    of the fp32 graph's: ({unit name: form}, the search's record). Units are promoted in order of
    gain (drift removed per cost), the count found by binary search; ordering by ratio leaves a
    large unit whose drift is large in total but small per weight for last, so each such unit
    is also tried first and the cheaper of the two plans kept."""
    base = probe.nll({})
    measured: dict[frozenset, float] = {}

    def increase(promoted: frozenset) -> float:
        if promoted not in measured:
            chosen = _forms(units, promoted)
            replaced = {u.feed: u.value(chosen[u.name]) for u in units}
            measured[promoted] = math.exp(probe.nll(replaced) - base) - 1
        return measured[promoted]

    def cost(promoted: frozenset) -> float:
        return sum(
            EXTRA_COST[u.alternative] * u.weight.numel() for u in units if u.name in promoted
        )

    by_gain = sorted(units, key=Unit.best_gain, reverse=True)
    total = sum(u.weight.numel() for u in units)
    big = [u for u in units if u.weight.numel() >= BIG * total]
    orders = [by_gain] + ([big + [u for u in by_gain if u not in big]] if big else [])
    found, searches = [], []
    for order in orders:
        prefix = lambda k, order=order: frozenset(u.name for u in order[:k])  # noqa: E731
        lo, hi = 0, len(order)
        if increase(prefix(lo)) > target:
            while hi - lo > 1:  # invariant: lo over the target, hi within it (or all promoted)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if increase(prefix(mid)) <= target else (mid, hi)
            lo = hi
        found.append(prefix(lo))
        increase(prefix(lo))  # measured already, unless every unit had to be promoted
        tried = [k for k in range(len(order) + 1) if prefix(k) in measured]
        searches.append([{"promoted": k, "increase": round(increase(prefix(k)), 5)} for k in tried])
    within = [p for p in found if increase(p) <= target] or found
    best = min(within, key=lambda p: (cost(p), increase(p)))
    record = {
        "target": round(target, 5),
        "calibration_tokens": probe.tokens,
        "calibration_increase": round(increase(best), 5),
        "promoted": len(best),
        "orders": ["gain"] + (["large units first"] if big else []),
        "chosen_order": found.index(best),
        "search": searches,
    }
    return _forms(units, best), record


def _forms(units: list[Unit], promoted: frozenset) -> dict[str, str]:
    return {u.name: u.alternative if u.name in promoted else "fast" for u in units}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation of two lists (None for fewer than three values)."""
    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    r = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
    return None if torch.isnan(r) else round(float(r), 3)


def rounded(x: float) -> float:
    return float(f"{x:.{KL_DIGITS}g}")
