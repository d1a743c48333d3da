"""The manifest (llmc.json) of a new build: what was built, from what, with which toolchain,
and the generation defaults the runtime needs. Verification and perplexity are added later."""

from __future__ import annotations

import platform
import time

from llmc import __version__
from llmc.host import host_cpu


def assemble(config, source, graph, emitted, reports, loaded, calibration=None) -> dict:
    import torch
    import transformers

    quantization = None
    if graph.quantization is not None:
        calib = calibration.record() if calibration is not None else None
        quantization = {**graph.quantization, "calibration": calib}
    return {
        "llmc_version": __version__,
        "toolchain": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **emitted.toolchain,
        },
        "source": source.to_dict(),
        "model": graph.spec.to_dict(),
        "target": {
            "name": config.target,
            "flavor": emitted.flavor,
            "files": {"model": emitted.files[0]},
            **(emitted.target or {}),
        },
        "io": (emitted.io or graph.io).to_manifest(),
        "quantization": quantization,
        # a pass's seconds vary run to run: they go to "build" (left out of the content hash)
        "passes": [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in reports],
        "graph": {
            "nodes": sum(emitted.op_histogram.values()),
            "op_histogram": emitted.op_histogram,
        },
        "verification": {"skipped": True},
        "generation": generation_defaults(loaded.model, loaded.tokenizer),
        "build": {
            "created": utc_now(),
            "seconds": None,
            "host": host_cpu(),  # the kernels verification ran on depend on it
            "pass_seconds": {r.name: round(r.seconds, 3) for r in reports},
        },
    }


def utc_now() -> str:
    """The build field's time stamp, e.g. 2026-12-02T02:06:01Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def generation_defaults(model, tok) -> dict:
    """End-of-sequence ids (the tokenizer's and the generation config's), padding, the chat
    template and the special tokens."""
    gen_config = getattr(model, "generation_config", None)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(gen_config, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    pad = tok.pad_token_id
    if pad is None:
        pad = getattr(gen_config, "pad_token_id", None)
    return {
        "eos_token_ids": sorted(eos),
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": pad if pad is not None else (min(eos) if eos else 0),
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
        "special_tokens": {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
    }
