"""The typed build configuration, resolved from CLI flags or the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class BuildConfig:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct
    target: str = "onnx"
    out: Path | None = None  # None: artifacts/<model>-<target>
    verify: bool = True
    passes: str | None = None  # e.g. "-eliminate_dead_code"
    tolerance: float | None = None  # None: 1e-4 for tiny models, 1e-3 otherwise
    max_context: int | None = None  # None: the model's own
    decode_steps: int = 8
    precision: str | None = None  # OpenVINO compute precision at run time: "f32" (default) | "bf16"
    # quantization (passes/quantize_weights.py); None: fp32
    quant: str | None = None  # "int8" | "int4" | "gptq" | "awq"
    group_size: int = 32  # 0: one group per output channel
    sym: bool | None = None  # None: symmetric for int8, asymmetric for 4-bit methods
    calib: Path | None = None  # text for GPTQ/AWQ (None: the shipped dev text when present)
    calib_samples: int = 32
    calib_seqlen: int = 256
    # perplexity and the quality gate (llmc/evaluate.py)
    eval_file: Path | None = None
    eval_tokens: int = 8192
    max_ppl_increase: float | None = None  # fraction, e.g. 0.05

    def describe(self) -> dict:
        return {
            "model": self.model or "SmolLM2-135M-Instruct (default)",
            "target": self.target,
            "out": str(self.out) if self.out else "artifacts/<model>-<target>",
            "verify": self.verify,
            "passes": self.passes or "all",
            "max_context": self.max_context or "model's",
            **({"quant": self.quant} if self.quant else {}),
            **({"precision": self.precision} if self.precision else {}),
            **({"eval": str(self.eval_file)} if self.eval_file else {}),
        }
