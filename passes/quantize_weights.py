"""Weight-only quantization of every linear and embedding weight (RTN, GPTQ or AWQ).

Before: y = aten.linear(x, W, b)                      e = aten.embedding(E, ids)
After:  y = llmc.linear_nbits(x, q, scales, zeros, bits, group, b)
        e = llmc.embedding_nbits(ids, q, scales, zeros, bits, group)

Policy (the report lists every exception):
- 4-bit methods quantize the linears to 4 bits, except the lm_head and any layer whose relative
  error is above `int8_threshold` (on the calibration activations when there are some, else on
  the weights): those get 8 bits.
- Embedding tables always get 8 bits (a tied lm_head shares the table, not the codes: each op
  keeps the layout its kernel reads).
- A layer whose input size is not a multiple of the group size stays fp32, with a note.
- AWQ folds its per-channel scales into the op in front of the scaled linears (a norm's weight,
  or the up projection in front of down); linears without such a producer are quantized by RTN.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from llmc.compiler import ops as _ops  # noqa: F401  (registers the llmc ops)
from llmc.compiler import precision as P
from llmc.compiler import quant_cache
from llmc.compiler import quantize as Q
from llmc.compiler.graph import Graph
from llmc.compiler.pass_manager import Pass, PassContext, PassReport
from llmc.passes._quant_plan import choose_forms, default_form, layer_name, plan_forms, unit_of
from llmc.passes._util import aten, erase_unused, evaluate, is_call

METHODS = {"int8": 8, "int4": 4, "gptq": 4, "awq": 4}
_NORMS = (torch.ops.llmc.rms_norm.default, torch.ops.llmc.skip_rms_norm.default)


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "int8" | "int4" | "gptq" | "awq"
    group: int = 32  # input channels per scale; 0: one group per row
    sym: bool | None = None  # None: symmetric for int8, asymmetric for 4-bit methods
    int8_threshold: float = 0.15  # 4-bit layers whose relative error exceeds this get 8 bits
    awq_tokens: int = 1024  # calibration tokens the AWQ search scores each candidate on
    # a 4-bit precision plan: the perplexity increase (fraction) it may cost on the calibration
    # text, and the share of it the plan aims at (the rest is left for held-out text and kernels)
    budget: float | None = None
    budget_margin: float = 0.6
    drift_tokens: int = 128  # calibration tokens each matmul's drift is measured on (0: none)

    @property
    def bits(self) -> int:
        return METHODS[self.method]

    @property
    def symmetric(self) -> bool:
        return self.sym if self.sym is not None else self.bits == 8

    @property
    def planned(self) -> bool:
        return self.budget is not None and self.bits == 4

    @property
    def calibrated(self) -> bool:
        return self.method in ("gptq", "awq") or self.planned

    def recipe(self) -> dict:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group,
            "symmetric": "per layer (plan)" if self.planned else self.symmetric,
            "int8_threshold": self.int8_threshold,
            **({"max_ppl_increase": self.budget} if self.planned else {}),
        }


class QuantizeWeights(Pass):
    name = "quantize_weights"
    lossy = True  # the pass manager records its difference instead of refusing it

    def __init__(self, config: QuantConfig):
        self.config = config

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from llmc.passes.prune_lm_head import lm_head

        cfg = self.config
        if cfg.calibrated and not ctx.calibration:
            raise ValueError(f"{cfg.method} needs calibration sequences (PassContext.calibration)")
        linears = [n for n in graph.fx.nodes if _weight(graph, n) is not None]
        head, _ = lm_head(graph)
        notes: list[str] = []
        plan_rows = fitted = ctx.calibration
        if cfg.planned and ctx.calibration:  # plans are scored on rows GPTQ does not fit
            plan_rows, fitted = P.held_out(ctx.calibration, P.PLAN_TOKENS)
        stats = _Statistics(graph, linears, fitted, cfg) if cfg.calibrated else None
        if cfg.method == "awq":
            notes += _apply_awq(graph, linears, stats, cfg, head)
        counts = {"quantized": 0, "int4": 0, "int8": 0, "fp32": 0, "embeddings": 0}
        done: list[Q.Quantized] = []

        def once(make, w, h, bits: int, group: int, sym: bool, method: str):
            """`make()` -> (Quantized, error), run once per distinct weight and grid: another
            target's or an earlier build's result is reused (compiler/quant_cache)."""
            quant, error, reused = quant_cache.quantize(
                make, w, h, bits, group, sym, method, ctx.stage_cache
            )
            ctx.reused["quantized_weights"] += reused  # build-dependent: not in the report
            return quant, error

        def linear(w, h, bits: int, group: int, sym: bool | None = None, gptq: bool = True):
            sym = _symmetric(cfg, bits) if sym is None else sym
            gptq = gptq and h is not None and (cfg.method == "gptq" or cfg.planned)
            make = lambda: _quantize(w, h, bits, group, sym, gptq)  # noqa: E731
            return once(make, w, h, bits, group, sym, "gptq" if gptq else "rtn")

        units: list[P.Unit] = []
        for node in linears:
            w = _weight(graph, node)
            k = w.shape[1]
            group = cfg.group or k
            if k % group:
                notes.append(
                    f"{layer_name(node)}: input size {k} is not a multiple of {group}; fp32"
                )
                counts["fp32"] += 1
                continue
            h = stats.hessian(node) if stats else None
            unit = unit_of(graph, node, w, units)
            units.append(unit)
            if cfg.planned:
                plan_forms(unit, h, group, linear, cfg.sym)
                continue
            bits = 8 if node is head else cfg.bits
            quant, error = linear(w, h, bits, group)
            if bits == 4 and error > cfg.int8_threshold:
                notes.append(
                    f"{layer_name(node)}: 4-bit error {error:.3f} > {cfg.int8_threshold}; 8 bits"
                )
                quant, error = linear(w, h, 8, group)
            elif node is head and cfg.bits == 4:
                notes.append(f"{layer_name(node)}: the lm_head keeps 8 bits")
            form = default_form(quant)
            unit.forms[form], unit.errors[form] = quant, error**2
        chosen, drift, plan = choose_forms(graph, units, cfg, ctx, notes, plan_rows)
        for unit in units:
            quant = unit.forms[chosen[unit.name]]
            _replace_linear(graph, unit.node, quant)
            done.append(quant)
            counts["quantized"] += 1
            counts[f"int{quant.bits}"] += 1
        for node in [n for n in graph.fx.nodes if is_call(n, aten.embedding.default)]:
            table = _stored_matrix(graph, node.args[0])
            if table is None:
                continue
            group = cfg.group or table.shape[1]
            if cfg.planned:  # the planned 8-bit form's group: a tied lm_head shares the table
                group = P.int8_group(table.shape[1], group)
            if table.shape[1] % group:
                notes.append(
                    f"{layer_name(node)}: width {table.shape[1]} not a multiple of {group}"
                )
                continue
            make = lambda table=table, group=group: (Q.rtn(table, 8, group, sym=True), 0.0)  # noqa: E731
            quant, _ = once(make, table, None, 8, group, True, "rtn-embedding")
            _replace_embedding(graph, node, quant)
            done.append(quant)
            counts["embeddings"] += 1
        modified = counts["quantized"] + counts["embeddings"] > 0
        if modified:
            graph.quantization = {**cfg.recipe(), "weights_sha256": quant_cache.rows_digest(done)}
            graph.quantization.update({"drift": drift} if drift else {})
            graph.quantization.update({"plan": plan} if plan else {})
        return PassReport(self.name, modified=modified, counts=counts, notes=notes)


# -- quantizing one weight ------------------------------------------------------------------------


def _symmetric(cfg: QuantConfig, bits: int) -> bool:
    return cfg.symmetric if bits == cfg.bits else True  # 8-bit fallbacks are symmetric


def _quantize(w, h, bits, group, sym: bool, gptq: bool) -> tuple[Q.Quantized, float]:
    """(quantized weight, relative error: on the calibration outputs if `h`, else the weight);
    `gptq` needs `h`."""
    quant = Q.gptq(w, h, bits, group, sym) if gptq else Q.rtn(w, bits, group, sym)
    w_hat = quant.dequantize()
    if h is not None:
        error = Q.output_error(w, w_hat, h) ** 0.5
    else:
        error = float((w - w_hat).norm() / w.norm().clamp(min=1e-12))
    return quant, error


def _constants(graph: Graph, node, quant: Q.Quantized, kind: str):
    base = (layer_name(node) or node.name) + f".{kind}"
    qweight = graph.add_constant(base + ".qweight", quant.packed())
    scales = graph.add_constant(base + ".scales", quant.scales.contiguous())
    zeros = None if quant.sym else graph.add_constant(base + ".zeros", quant.zeros.contiguous())
    return qweight, scales, zeros


def _replace_linear(graph: Graph, node, quant: Q.Quantized) -> None:
    qweight, scales, zeros = _constants(graph, node, quant, f"int{quant.bits}")
    bias = _bias(node)
    with graph.fx.inserting_before(node):
        args = (_input(node), qweight, scales, zeros, quant.bits, quant.group, bias)
        new = graph.call(torch.ops.llmc.linear_nbits.default, args, like=node)
    node.replace_all_uses_with(new)
    erase_unused(graph, [node])


def _replace_embedding(graph: Graph, node, quant: Q.Quantized) -> None:
    qweight, scales, zeros = _constants(graph, node, quant, "int8")
    with graph.fx.inserting_before(node):
        args = (node.args[1], qweight, scales, zeros, quant.bits, quant.group)
        new = graph.call(torch.ops.llmc.embedding_nbits.default, args, like=node)
    node.replace_all_uses_with(new)
    erase_unused(graph, [node])


def _weight(graph: Graph, node) -> torch.Tensor | None:
    """The stored [out, in] weight of a linear (or of a Conv1D's addmm, stored [in, out])."""
    if is_call(node, aten.linear.default):
        return _stored_matrix(graph, node.args[1])
    if is_call(node, aten.addmm.default) and not node.kwargs:
        w = _stored_matrix(graph, node.args[2])
        return w.T.contiguous() if w is not None else None
    return None


def _input(node):
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def _bias(node):
    if node.target is aten.addmm.default:
        return node.args[0]
    return node.args[2] if len(node.args) > 2 else None


def _stored_matrix(graph: Graph, node) -> torch.Tensor | None:
    value = graph.tensor(node) if isinstance(node, torch.fx.Node) else None
    if value is None or value.dim() != 2 or not value.is_floating_point():
        return None
    return value.detach().to(torch.float32)


# -- calibration ----------------------------------------------------------------------------------


class _Statistics:
    """The calibration inputs of every linear: H = 2XᵀX / n per distinct input node, and for
    AWQ a sample of X's rows, from running the graph on the calibration sequences."""

    def __init__(self, graph: Graph, linears, sequences, cfg: QuantConfig):
        from llmc.compiler.trace import prefill_inputs

        inputs = list(dict.fromkeys(_input(n) for n in linears))
        self._h = {x: None for x in inputs}
        self._samples: dict = {x: [] for x in inputs}
        self._count = 0
        per_sequence = max(1, cfg.awq_tokens // max(1, len(sequences)))
        g = torch.Generator().manual_seed(0)
        names = graph.input_names
        for ids in sequences:
            values = prefill_inputs(graph.spec, ids, graph.kv_mode, graph.io.logits_index)
            feeds = {graph.user_input(n): v for n, v in zip(names, values, strict=True)}
            outs = evaluate(graph, inputs, feeds)
            for x, value in zip(inputs, outs, strict=True):
                rows = value.reshape(-1, value.shape[-1]).to(torch.float64)
                h = 2 * rows.T @ rows
                self._h[x] = h if self._h[x] is None else self._h[x] + h
                if cfg.method == "awq":
                    pick = torch.randperm(len(rows), generator=g)[:per_sequence]
                    self._samples[x].append(rows[pick].to(torch.float32))
            self._count += len(ids)

    def hessian(self, node) -> torch.Tensor:
        return self._h[_input(node)] / self._count

    def sample(self, node) -> torch.Tensor:
        return torch.cat(self._samples[_input(node)])

    def rescale(self, x, s: torch.Tensor) -> None:
        """The linears reading `x` now read x / s (AWQ folded s into its producer)."""
        s64 = s.to(torch.float64)
        self._h[x] = self._h[x] / s64[:, None] / s64[None, :]
        self._samples[x] = [r / s for r in self._samples[x]]


# -- AWQ ------------------------------------------------------------------------------------------


def _apply_awq(graph: Graph, linears, stats: _Statistics, cfg: QuantConfig, head) -> list[str]:
    """Search and fold per-channel scales for every group of linears sharing a foldable input.
    Scales the stored weights in place of new constants; returns notes."""
    notes = []
    by_input: dict = {}
    for node in linears:
        by_input.setdefault(_input(node), []).append(node)
    scaled = 0
    for x, group in by_input.items():
        fold = _folder(graph, x)
        if fold is None:
            continue
        if any(n.target is not aten.linear.default for n in group):
            continue  # Conv1D weights are stored transposed: left to RTN
        weights = [_weight(graph, n) for n in group]
        if cfg.group and weights[0].shape[1] % cfg.group:
            continue
        # search on the grid the layers will get: the lm_head keeps 8 symmetric bits
        bits, sym = (8, True) if head in group else (cfg.bits, cfg.symmetric)
        k = weights[0].shape[1]
        s, alpha = Q.awq_scales(weights, stats.sample(group[0]), bits, cfg.group or k, sym)
        if alpha == 0:
            continue
        fold(1 / s)
        for node, w in zip(group, weights, strict=True):
            node.update_arg(1, graph.add_constant(layer_name(node) + ".awq_weight", w * s))
        stats.rescale(x, s)
        scaled += len(group)
    notes.append(f"awq: {scaled} of {len(linears)} linears scaled")
    return notes


def _folder(graph: Graph, x):
    """A function that multiplies the producer of `x` by per-channel factors, or None."""
    producer = x.args[0] if is_call(x, operator.getitem) else x
    if is_call(producer, *_NORMS) and (x is producer or x.args[1] == 0):
        index = 1 if producer.target is torch.ops.llmc.rms_norm.default else 2
        weight = graph.tensor(producer.args[index])
        if weight is None:
            return None

        def fold_norm(factor):
            new = graph.add_constant(layer_name(producer) + ".awq_norm", weight * factor)
            producer.update_arg(index, new)

        return fold_norm
    if is_call(producer, aten.mul.Tensor) and x is producer:
        for arg in producer.args:  # silu(gate) * up: scale up's output channels
            up = arg.args[0] if is_call(arg, operator.getitem) else arg
            if is_call(up, aten.linear.default) and arg is up and len(up.users) == 1:
                weight, bias = graph.tensor(up.args[1]), None
                if len(up.args) > 2 and up.args[2] is not None:
                    bias = graph.tensor(up.args[2])
                if weight is None:
                    return None

                def fold_up(factor, up=up, weight=weight, bias=bias):
                    up.update_arg(
                        1, graph.add_constant(layer_name(up) + ".awq", weight * factor[:, None])
                    )
                    if bias is not None:
                        up.update_arg(
                            2, graph.add_constant(layer_name(up) + ".awq_b", bias * factor)
                        )

                return fold_up
    return None
