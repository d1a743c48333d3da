"""Parity of a built artifact against PyTorch eager: logits over a prefill and decode steps, greedy
token agreement, and a left-padded batch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from llmc.compiler.trace import cache_kwarg
from llmc.contract import KVMode

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
    reference: str = "pytorch-eager"
    forms: list[str] = field(default_factory=list)  # the runtime forms checked (all must pass)

    @property
    def passed(self) -> bool:
        worst = max(self.max_abs_diff, self.batched_max_abs_diff)
        return worst <= self.tolerance and self.greedy_agreement == self.steps_compared

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def merge(self, other: VerifyResult) -> None:
        """Fold in another runtime form's check of the same prompts: the worst of both."""
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.batched_max_abs_diff = max(self.batched_max_abs_diff, other.batched_max_abs_diff)
        self.greedy_agreement = min(self.greedy_agreement, other.greedy_agreement)
        self.forms += other.forms

    def summary(self) -> str:
        return (
            f"max |Δlogits| {self.max_abs_diff:.2e} (batched {self.batched_max_abs_diff:.2e}, "
            f"tolerance {self.tolerance:.0e}); greedy agreement "
            f"{self.greedy_agreement}/{self.steps_compared}"
            + (f" ({' and '.join(self.forms)})" if len(self.forms) > 1 else "")
        )


class EagerReference:
    """Teacher-forced steps of the PyTorch model itself (transformers' own cache)."""

    name = "pytorch-eager"

    def __init__(self, model):
        self.model, self.cache = model, None

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache = None
        return self._step(torch.tensor([ids]))

    def decode(self, token: int) -> torch.Tensor:
        return self._step(torch.tensor([[token]]))

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{cache_kwarg(self.model): self.cache})
        self.cache = out["cache" if "cache" in out else "past_key_values"]
        return out.logits[:, -1, :].float()


class GraphReference:
    """Teacher-forced steps of the pass-transformed graph in PyTorch (its llmc ops run their
    reference implementations): for a quantized artifact, the exact numbers it should compute,
    so verification checks the lowering and not the quantization error (perplexity does that)."""

    name = "pytorch-llmc-graph"

    def __init__(self, graph, capacity: int):
        self.graph, self.capacity = graph, capacity
        self.past: list[torch.Tensor] = []
        self.length = 0

    def prefill(self, ids: list[int]) -> torch.Tensor:
        spec = self.graph.spec
        shape = (1, spec.num_kv_heads, self.capacity if self._shared else 0, spec.head_dim)
        self.past = [torch.zeros(shape) for _ in range(2 * spec.num_layers)]
        self.length = 0
        return self._step(ids)

    def decode(self, token: int) -> torch.Tensor:
        return self._step([token])

    @property
    def _shared(self) -> bool:
        return self.graph.kv_mode is KVMode.SHARED

    def _step(self, ids: list[int]) -> torch.Tensor:
        s, total = len(ids), self.length + len(ids)
        inputs = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.arange(self.length, total)[None],
            "seqlens_k": torch.tensor([total - 1], dtype=torch.int32),
            "attention_mask": torch.ones(1, total, dtype=torch.int64),
            "logits_index": torch.tensor([s - 1]),
        }
        names = self.graph.input_names
        values = [inputs[n] for n in names if not n.startswith("past_key_values.")]
        logits, *present = self.graph.run(*values, *self.past)
        self.past, self.length = list(present), total
        return logits[:, -1, :].float()


@torch.no_grad()
def verify(
    reference,
    session,
    prompts: list[list[int]],
    tolerance: float,
    decode_steps: int = 8,
    texts: tuple[str, ...] = PROMPTS,
) -> VerifyResult:
    """Teacher-forced comparison: both sides get PyTorch's greedy token at every step. PyTorch's
    own fp32 matmuls are held at full precision (no TF32/bf16 shortcuts on CPUs that offer them)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _verify(reference, session, prompts, tolerance, decode_steps, texts)
    finally:
        torch.set_float32_matmul_precision(previous)


def _verify(reference, session, prompts, tolerance, decode_steps, texts) -> VerifyResult:
    result = VerifyResult(
        tolerance=tolerance,
        prompts=list(texts),
        decode_steps=decode_steps,
        reference=reference.name,
    )
    prefill_logits = []
    for ids in prompts:
        ref = reference.prefill(ids)
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
            ref = reference.decode(token)
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


@torch.no_grad()
def greedy(model, graph, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """PyTorch's greedy tokens (`steps` of them, end-of-sequence or not) after each prompt: of
    the model eager, or of a quantized artifact's graph (`graph`, as verification compares)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        found = []
        for ids in prompts:
            capacity = len(ids) + steps + 1
            reference = EagerReference(model) if graph is None else GraphReference(graph, capacity)
            logits, tokens = reference.prefill(ids), []
            for step in range(steps):
                tokens.append(int(logits[0].argmax()))
                if step + 1 < steps:
                    logits = reference.decode(tokens[-1])
            found.append(tokens)
        return found
    finally:
        torch.set_float32_matmul_precision(previous)


# -- the verification of a build (llmc build, llmc verify) -------------------------------------
def default_tolerance(source_kind: str) -> float:
    """DESIGN.md's bars: 1e-4 on tiny random models, 1e-3 on real ones."""
    return 1e-4 if source_kind == "tiny" else 1e-3


def verify_prompts(tokenizer, max_context: int, decode_steps: int = 8) -> list[list[int]]:
    """The fixed verification prompts, cut so that prompt and decode steps fit the context
    (`tokenizer`: transformers' or the runtime's, whose encodings the build checks are equal)."""
    keep = max(1, max_context - decode_steps)
    return [tokenizer.encode(text)[:keep] for text in PROMPTS]


@dataclass
class BuildVerification:
    """What a build's verification found: the exact kernels against the reference, and where
    the artifact's default session runs faster kernels, their distance from the same reference
    (for the record; the build does not refuse them)."""

    exact: VerifyResult
    fast: dict | None = None

    def to_dict(self) -> dict:
        return {**self.exact.to_dict(), **({"fast_kernels": self.fast} if self.fast else {})}


def verify_artifact(
    model_class, directory, manifest: dict, model, tokenizer, tolerance: float, steps: int,
    graph=None,
) -> BuildVerification:  # fmt: skip
    """Verify the artifact in `directory`. fp32 (`graph` None): its exact session against
    PyTorch eager, at f32 even when the artifact asks for bf16 at run time. Quantized: against
    its own graph run in PyTorch (the same dequantized weights), so the check is of the lowering
    and perplexity (`--eval`) measures the quantization."""
    loaded = model_class.open(directory, manifest, exact=True)
    prompts = verify_prompts(tokenizer, loaded.max_context, steps)
    capacity = max(2, max(len(p) for p in prompts) + steps + 1)

    def check(form_model) -> VerifyResult:
        reference = EagerReference(model) if graph is None else GraphReference(graph, capacity)
        found = verify(reference, form_model.sequence(), prompts, tolerance, steps)
        found.forms = [form_model.form]
        return found

    # the same artifact as other runtimes run it (OpenVINO: the stateful IR the runtime rewrites),
    # one loaded form at a time
    others, result = loaded.other_forms(), check(loaded)
    del loaded
    for options in others.values():
        result.merge(check(model_class.open(directory, manifest, exact=True, **options)))
    if graph is None:
        return BuildVerification(result)
    fast = model_class.open(directory, manifest)
    if not fast.fast_kernels:  # the default model is the exact one
        return BuildVerification(result)
    decode = verify(GraphReference(graph, capacity), fast.sequence(), prompts, tolerance, steps)
    record = {
        "kernels": fast.fast_kernels,
        "max_abs_diff": decode.max_abs_diff,
        "greedy_agreement": decode.greedy_agreement,
        "steps_compared": decode.steps_compared,
    }
    return BuildVerification(result, record)
