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

    def describe(self) -> dict:
        return {
            "model": self.model or "SmolLM2-135M-Instruct (default)",
            "target": self.target,
            "out": str(self.out) if self.out else "artifacts/<model>-<target>",
            "verify": self.verify,
            "passes": self.passes or "all",
            "max_context": self.max_context or "model's",
        }
