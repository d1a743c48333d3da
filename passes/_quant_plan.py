"""The quantize_weights pass's side of drift attribution and precision plans: the plan's view
of each linear (compiler/precision.Unit), the forms a planned 4-bit matmul may take, and the
records both leave in the manifest."""

from __future__ import annotations

from llmc.compiler import precision as P
from llmc.compiler import quantize as Q
from llmc.compiler.graph import module_path
from llmc.passes._util import aten


def layer_name(node) -> str:
    path = module_path(node)
    return path[-1][0] if path else node.name


def default_form(quant: Q.Quantized) -> str:
    """A default build's form of a weight: int8, int4 (symmetric) or int4-asym."""
    return f"int{quant.bits}" + ("" if quant.sym or quant.bits == 8 else "-asym")


def unit_of(graph, node, w, units) -> P.Unit:
    """The plan's view of a linear: its weight and the placeholder to replace it in probes (its
    own one where a tied embedding reads the same table, so a probe changes only the matmul)."""
    index = 2 if node.target is aten.addmm.default else 1
    feed, name = node.args[index], layer_name(node)
    if len(feed.users) > 1:
        feed = graph.add_constant(name + ".probe", graph.tensor(feed))
        node.update_arg(index, feed)
    if any(u.name == name for u in units):
        name = f"{name}/{node.name}"
    return P.Unit(node, name, w, feed, transposed=index == 2)


def plan_forms(unit: P.Unit, h, group: int, linear, symmetric_only: bool | None = None) -> None:
    """The forms a planned 4-bit matmul may take (compiler/precision.py), with their errors;
    `symmetric_only` (a target whose pipeline sets sym=True: TensorRT) leaves out the exact
    grid, whose zero points are fractional."""
    w = unit.weight
    fast, error = linear(w, h, 4, group, sym=True)
    if h is not None:  # GPTQ, unless round-to-nearest leaves the smaller output error
        rtn, rtn_error = linear(w, h, 4, group, sym=True, gptq=False)
        fast, error = (rtn, rtn_error) if rtn_error < error else (fast, error)
    unit.forms["fast"], unit.errors["fast"] = fast, error**2
    _, _, _, on_grid = Q.exact_grid(w.view(w.shape[0], -1, group), 4)
    if symmetric_only is not True and bool(on_grid.all()):  # a target taking zero points
        unit.forms["exact"], unit.errors["exact"] = Q.rtn(w, 4, group, sym=False), 0.0
    int8, error = linear(w, h, 8, P.int8_group(w.shape[1], group), sym=True, gptq=False)
    unit.forms["int8"], unit.errors["int8"] = int8, error**2


def choose_forms(graph, units: list[P.Unit], cfg, ctx, notes, plan_rows=None):
    """Each unit's form ({name: form}), the drift record and the plan record: a planned build
    measures every unit's `fast` drift and searches the plan, scoring plans on `plan_rows`
    (calibration rows GPTQ did not fit: P.held_out); a default build keeps its one form per unit
    and measures its drift (with calibration text and `drift_tokens`)."""
    plan_rows = ctx.calibration if plan_rows is None else plan_rows
    default = {u.name: next(iter(u.forms)) for u in units}
    if not (cfg.drift_tokens and ctx.calibration and units):
        if cfg.planned:
            raise ValueError("a precision budget needs calibration sequences and drift_tokens")
        return default, None, None
    probe = P.Probe(graph, ctx.calibration, cfg.drift_tokens)
    measured = "fast" if cfg.planned else None
    P.attribute(units, lambda u: measured or default[u.name], probe)
    plan_record, chosen = None, default
    if cfg.planned:
        P.estimate_alternatives(units)
        target = cfg.budget * cfg.budget_margin
        search = P.Probe(graph, plan_rows, P.PLAN_TOKENS)
        chosen, plan_record = P.plan(units, search, target)
        plan_record["held_out"] = plan_rows is not ctx.calibration
        forms = list(chosen.values())
        plan_record["forms"] = {f: forms.count(f) for f in ("fast", "exact", "int8")}
        plan_record["budget"] = cfg.budget
        notes.append(
            "plan: "
            + ", ".join(f"{n} {f}" for f, n in plan_record["forms"].items() if n)
            + f" ({'held-out ' if plan_record['held_out'] else ''}calibration perplexity "
            f"{plan_record['calibration_increase']:+.2%}, "
            f"aiming at {target:+.2%} of a {cfg.budget:.1%} budget)"
        )
    layers = []
    for u in units:
        form = chosen[u.name]
        entry = {"name": u.name, "form": form, "bits": u.forms[form].bits}
        entry["kl"] = P.rounded(u.kl[form])
        if form != (measured or form):
            entry["kl_fast"], entry["kl_estimated"] = P.rounded(u.kl["fast"]), True
        entry["error"] = P.rounded(u.errors[form])
        layers.append(entry)
    kls = [u.kl[measured or default[u.name]] for u in units]
    errs = [u.errors[measured or default[u.name]] for u in units]
    drift = {
        "measure": "mean KL(fp32 graph || only this matmul quantized) per calibration token",
        "measured_form": measured or "the built form",
        "tokens": probe.tokens,
        "proxy": "relative output error (on the calibration inputs where the build has them)",
        "proxy_spearman": P.spearman(kls, errs),
        "layers": layers,
    }
    return chosen, drift, plan_record
