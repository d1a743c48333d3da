"""Quantize each weight once: an in-process memo (the targets of one multi-target build share
it) over the stage cache on disk (rebuilds), keyed by the weight's bytes and the grid; and the
digest by which the targets of one build are checked to carry the same quantized weights."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from llmc.compiler import quantize as Q

_MEMO: dict[str, tuple[Q.Quantized, float]] = {}
_MEMO_BYTES = 0
_MEMO_LIMIT = 2 << 30  # past 2 GB of codes the memo starts over (a long-lived API process)


def _tensor_digest(t: torch.Tensor | None) -> str:
    if t is None:
        return "-"
    array = t.detach().contiguous().cpu().numpy()
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def quantize(make, weight, hessian, bits: int, group: int, sym: bool, method: str, cache):
    """`make()` -> (Quantized, error), or the result of an earlier identical call; returns
    (Quantized, error, reused)."""
    global _MEMO_BYTES
    from llmc.cache import code_digest, digest

    key = digest(
        [_tensor_digest(weight), _tensor_digest(hessian), bits, group, sym, method, code_digest()]
    )
    if key in _MEMO:
        if cache is not None and not cache.has_quantized(key):  # another build's, in memory
            _store(cache, key, _MEMO[key])
        return (*_MEMO[key], True)
    found = cache.quantized(key) if cache is not None else None
    if found is not None:
        quant = Q.Quantized(found["codes"], found["scales"], found["zeros"], bits, group, sym)
        result, reused = (quant, float(found["error"])), True
    else:
        result, reused = make(), False
        if cache is not None:
            _store(cache, key, result)
    if _MEMO_BYTES > _MEMO_LIMIT:
        _MEMO.clear()
        _MEMO_BYTES = 0
    _MEMO[key] = result
    _MEMO_BYTES += result[0].codes.numel()
    return (*result, reused)


def _store(cache, key: str, result: tuple[Q.Quantized, float]) -> None:
    q, error = result
    cache.store_quantized(
        key, {"codes": q.codes, "scales": q.scales, "zeros": q.zeros, "error": torch.tensor(error)}
    )


def rows_digest(quants: list[Q.Quantized]) -> str:
    """sha256 over the sorted digests of every quantized output row (its bits, codes, scales and
    zeros): the same for two graphs that quantized the same rows the same way, whether a target
    fused Q, K and V into one matrix or reordered their rows."""
    rows: list[bytes] = []
    for q in quants:
        parts = [q.codes.to(torch.uint8).numpy(), q.scales.float().numpy().view(np.uint8)]
        if not q.sym:
            parts.append(q.zeros.float().numpy().view(np.uint8))
        table = np.ascontiguousarray(np.concatenate([p.reshape(len(p), -1) for p in parts], 1))
        tag = bytes([q.bits])
        rows.extend(hashlib.sha1(tag + row.tobytes()).digest() for row in table)
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update(row)
    return h.hexdigest()
