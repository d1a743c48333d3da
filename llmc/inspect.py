"""`llmc inspect`: a readable summary of an artifact's manifest."""

from __future__ import annotations

from pathlib import Path

# Contexts at which `llmc inspect` compares a recurrent state with a KV cache.
STATE_CONTEXTS = (4096, 32768)


def state_summary(state, model: dict) -> str:
    """A recurrent state's size per sequence beside what a KV cache of the same depth and width
    (one key and one value of the hidden size per layer and token, fp32) holds at a few
    contexts."""
    conv, ssm = (state.conv_channels, state.conv_width), (state.channels, state.state_size)
    kv_token = 2 * state.layers * int(model["hidden_size"]) * 4
    kv = ", ".join(f"{kv_token * n / 1e6:,.1f} MB at {n:,} tokens" for n in STATE_CONTEXTS)
    return (
        f"recurrent, {state.row_bytes / 1e6:.2f} MB per sequence whatever its length "
        f"(per layer: conv {conv[0]}×{conv[1]} + ssm {ssm[0]}×{ssm[1]}, {state.dtype}; "
        f"prompts in steps of {state.step_tokens}); a KV cache of the same depth and width "
        f"would hold {kv}"
    )


def render(manifest: dict, directory: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmc.contract import IOContract
    from llmc.evaluate import describe as describe_evaluation
    from llmc.host import describe

    console = Console(highlight=False)
    model, target = manifest["model"], manifest["target"]
    io = IOContract.from_manifest(manifest)
    size = sum(f["size"] for f in manifest["files"].values())
    console.print(
        f"[bold]{directory}[/bold]  llmc {manifest['llmc_version']}, "
        f"format {manifest['format_version']}"
    )
    console.print(f"source   {manifest['source']['kind']} {manifest['source']['ref']}")
    if io.recurrent:
        console.print(
            f"model    {model['architecture']}: {model['num_layers']} layers, hidden "
            f"{model['hidden_size']}, no attention, vocab {model['vocab_size']}, "
            f"context {io.max_context}"
        )
        console.print(f"state    {state_summary(io.cache, model)}")
    else:
        console.print(
            f"model    {model['architecture']}: {model['num_layers']} layers, "
            f"{model['num_heads']} heads / {model['num_kv_heads']} kv heads, "
            f"head dim {model['head_dim']}, vocab {model['vocab_size']}, "
            f"context {io.max_context}"
        )
    console.print(
        f"target   {target['name']} ({target['flavor']}), KV mode {io.kv_mode.value}, "
        f"logits {io.logits.value}"
        + (f", precision {target['precision']}" if "precision" in target else "")
    )
    if target.get("fused_ops"):
        fused = ", ".join(f"{k} {v}" for k, v in target["fused_ops"].items())
        console.print(f"fused    by the {target['name']} plugin at compile time: {fused}")
    tools = ", ".join(f"{k} {v}" for k, v in manifest["toolchain"].items())
    console.print(
        f"built    {manifest['build']['created']} in {manifest['build']['seconds']}s with {tools}"
    )
    if manifest.get("content_sha256"):
        cache = manifest["build"].get("cache") or {}
        reused = (
            f", reused from the stage cache ({cache['built']} build)" if cache.get("hit") else ""
        )
        console.print(f"content  sha256 {manifest['content_sha256'][:16]}…{reused}")
    ver = manifest["verification"]
    if ver.get("skipped"):
        console.print("verified [yellow]skipped (--no-verify)[/yellow]")
    else:
        mark = "[green]passed[/green]" if ver["passed"] else "[red]FAILED[/red]"
        console.print(
            f"verified {mark}: max |Δlogits| {ver['max_abs_diff']:.2e} (batched "
            f"{ver['batched_max_abs_diff']:.2e}, tolerance {ver['tolerance']:.0e}), greedy "
            f"{ver['greedy_agreement']}/{ver['steps_compared']} vs {ver['reference']}"
            + (f" ({' and '.join(ver['forms'])})" if len(ver.get("forms", [])) > 1 else "")
        )
    for name, record in (manifest.get("runtimes") or {}).items():
        if name != "llmc":
            from llmc.compat import summary

            console.print(f"runtime  {summary(name, record)}", markup=False)

    quant = manifest.get("quantization")
    if quant:
        calib = quant.get("calibration")
        where = (
            f", calibrated on {calib['samples']}×{calib['seqlen']} tokens of {calib['file']}"
            if calib
            else ""
        )
        sym = quant["symmetric"]
        grid = sym if isinstance(sym, str) else "symmetric" if sym else "asymmetric"
        console.print(
            f"quant    {quant['method']}: {quant['bits']}-bit {grid}, group "
            f"{quant['group_size'] or 'per row'}{where}"
        )
        _plan_and_drift(console, quant)
    fast = ver.get("fast_kernels")
    if fast:
        host = manifest["build"].get("host")
        console.print(
            f"         fast kernels (the default; --exact or exact=True turns them off), "
            f"{fast.get('kernels', 'int8 activations')}: max |Δlogits| "
            f"{fast['max_abs_diff']:.2e}, greedy "
            f"{fast['greedy_agreement']}/{fast['steps_compared']}"
            + (f", measured on {describe(host)}" if host else "")
        )
    evaluation = manifest.get("evaluation")
    if evaluation:
        console.print(f"ppl      {describe_evaluation(evaluation)}")
    cross = manifest.get("cross_check")
    if cross:
        mark = "[green]agree[/green]" if cross["passed"] else "[red]DISAGREE[/red]"
        console.print(f"targets  {', '.join(cross['targets'])} built together {mark}: "
                      f"{cross['summary']}")  # fmt: skip

    files = Table(
        "file", "MB", "sha256", title=f"files ({size / 1e6:.1f} MB)", title_justify="left"
    )
    for name, meta in manifest["files"].items():
        files.add_row(name, f"{meta['size'] / 1e6:.2f}", meta["sha256"][:16])
    console.print(files)

    passes = Table(
        "pass", "modified", "counts", "seconds", "max |Δ|", title="passes", title_justify="left"
    )
    seconds = manifest.get("build", {}).get("pass_seconds", {})
    for r in manifest["passes"]:
        took = r.get("seconds", seconds.get(r["name"]))  # older manifests kept it in the report
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        passes.add_row(
            r["name"], str(r["modified"]), counts, "" if took is None else f"{took:.3f}", diff
        )
        for note in r.get("notes", []):
            passes.add_row("", "", f"[dim]{note}[/dim]", "", "")
    console.print(passes)

    ops = Table(
        "op", "count", title=f"graph ({manifest['graph']['nodes']} nodes)", title_justify="left"
    )
    for op, n in sorted(manifest["graph"]["op_histogram"].items(), key=lambda kv: -kv[1]):
        ops.add_row(op, str(n))
    console.print(ops)


DRIFT_ROWS = 10  # matmuls listed, largest drift first


def _plan_and_drift(console, quant: dict) -> None:
    """The precision plan (forms chosen, calibration perplexity) and the matmuls whose
    quantization moves the logits most (measured KL divergence)."""
    plan = quant.get("plan")
    if plan:
        forms = ", ".join(f"{n} {f}" for f, n in plan["forms"].items() if n)
        console.print(
            f"plan     {forms} within a {plan['budget']:.1%} perplexity budget ("
            f"{'held-out ' if plan.get('held_out') else ''}calibration "
            f"{plan['calibration_increase']:+.2%} on {plan['calibration_tokens']} tokens, "
            f"aiming at {plan['target']:+.2%})"
        )
    drift = quant.get("drift")
    if not drift:
        return
    from rich.table import Table

    layers = sorted(drift["layers"], key=lambda e: -e.get("kl_fast", e["kl"]))
    table = Table(
        "matmul", "form", "KL", "KL 4-bit fast", "output error",
        title=f"drift: {drift['measure']} ({drift['tokens']} tokens; the output-error proxy "
        f"ranks them with Spearman {drift['proxy_spearman']})",
        title_justify="left",
    )  # fmt: skip
    for e in layers[:DRIFT_ROWS]:
        kl = f"{e['kl']:.2e}" + (" (est.)" if e.get("kl_estimated") else "")
        fast = f"{e['kl_fast']:.2e}" if "kl_fast" in e else ""
        name = e["name"].replace("model.", "")  # the module path without its wrappers
        table.add_row(name, e["form"], kl, fast, f"{e['error']:.2e}")
    if len(layers) > DRIFT_ROWS:
        table.add_row(f"[dim]… {len(layers) - DRIFT_ROWS} more in llmc.json[/dim]", "", "", "", "")
    console.print(table)
