"""`llmc build --json`: one machine-readable result for CI (artifacts, files and sizes,
verification, quality gate, timings, cache use, the cross-check of a multi-target build)."""

from __future__ import annotations


def report(results: list, cross_check: dict | None = None) -> dict:
    artifacts = []
    for r in results:
        m = r.manifest
        files = {name: meta["size"] for name, meta in m["files"].items()}
        verification = m.get("verification", {})
        evaluation = m.get("evaluation")
        build = m.get("build", {})
        artifacts.append(
            {
                "path": str(r.path),
                "target": m["target"]["name"],
                "model": m["source"]["ref"],
                "quantization": (m.get("quantization") or {}).get("method"),
                "content_sha256": m.get("content_sha256"),
                "files": files,
                "bytes": sum(files.values()),
                "verification": {
                    k: verification.get(k)
                    for k in (
                        "skipped",
                        "passed",
                        "max_abs_diff",
                        "batched_max_abs_diff",
                        "greedy_agreement",
                        "steps_compared",
                        "tolerance",
                    )
                    if k in verification
                },  # fmt: skip
                "tokenizer": (m.get("tokenizer") or {}).get("passed"),
                "quality_gate": None if evaluation is None else evaluation.get("gate", evaluation),
                "timings": {"seconds": build.get("seconds"), **build.get("stage_seconds", {})},
                "cache": build.get("cache", {"hit": False}),
            }
        )
    return {
        "ok": True,
        "artifacts": artifacts,
        **({"cross_check": cross_check} if cross_check is not None else {}),
    }
