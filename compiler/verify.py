"""Parity of a built artifact against PyTorch eager: logits over a prefill and decode steps, greedy
token agreement, and a left-padded batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from llmc.compiler.trace import cache_kwarg

PROMPTS = (
    "The capital of France is",
    "Once upon a time, a lighthouse keeper wrote a long story about",
)


@dataclass
class VerifyResult:
    tolerance: float
    max_abs_diff: float = 0.0
    batched_max_abs_diff: float = 0.0
    steps_compared: int = 0
    greedy_agreement: int = 0
    prompts: list[str] = field(default_factory=list)
    decode_steps: int = 8

    @property
    def passed(self) -> bool:
        worst = max(self.max_abs_diff, self.batched_max_abs_diff)
        return worst <= self.tolerance and self.greedy_agreement == self.steps_compared

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "reference": "pytorch-eager"}

    def summary(self) -> str:
        return (
            f"max |Δlogits| {self.max_abs_diff:.2e} (batched {self.batched_max_abs_diff:.2e}, "
            f"tolerance {self.tolerance:.0e}); greedy agreement "
            f"{self.greedy_agreement}/{self.steps_compared}"
        )


def _eager_step(model, ids: torch.Tensor, cache, mask: torch.Tensor | None = None):
    kwargs = {cache_kwarg(model): cache}
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    return out.logits[:, -1, :].float(), out["cache" if "cache" in out else "past_key_values"]


@torch.no_grad()
def verify(
    model,
    session,
    prompts: list[list[int]],
    tolerance: float,
    decode_steps: int = 8,
    texts: tuple[str, ...] = PROMPTS,
) -> VerifyResult:
    """Teacher-forced comparison: both sides get PyTorch's greedy token at every step."""
    result = VerifyResult(tolerance=tolerance, prompts=list(texts), decode_steps=decode_steps)
    prefill_logits = []
    for ids in prompts:
        ref, cache = _eager_step(model, torch.tensor([ids]), None)
        got = session.prefill(np.asarray([ids]))
        prefill_logits.append(ref[0].numpy())
        for step in range(decode_steps + 1):
            ref_np = ref.numpy()
            result.max_abs_diff = max(result.max_abs_diff, float(np.abs(ref_np - got).max()))
            result.steps_compared += 1
            token = int(ref_np[0].argmax())
            result.greedy_agreement += int(got[0].argmax() == token)
            if step == decode_steps:
                break
            ref, cache = _eager_step(model, torch.tensor([[token]]), cache)
            got = session.decode(np.asarray([[token]]))
    if len(prompts) > 1:  # left-padded batch: every row must match its own unpadded prefill
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
        got = session.prefill(ids, mask)
        result.batched_max_abs_diff = float(np.abs(np.stack(prefill_logits) - got).max())
    session.reset()
    return result
