"""The typed build configuration, resolved from CLI flags or the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmc.errors import LlmcError

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
    draft_layers: int | None = None  # a self-speculative draft: the first N decoder layers
    decode_steps: int = 8
    precision: str | None = None  # OpenVINO compute precision at run time: "f32" (default) | "bf16"
    autotune: bool | None = None  # inductor: autotune its matmul kernels (default: yes)
    # a vendor runtime the artifact must also load in (llmc/compat.py): "openvino-genai" with
    # --target openvino, "onnxruntime-genai" with --target onnx
    compat: str | None = None
    cache: bool = True  # reuse an identical earlier build (llmc.cache); False: build afresh
    # quantization (passes/quantize_weights.py); None: fp32
    quant: str | None = None  # "int8" | "int4" | "gptq" | "awq"
    group_size: int = 32  # 0: one group per output channel
    sym: bool | None = None  # None: symmetric for int8, asymmetric for 4-bit methods
    calib: Path | None = None  # text for GPTQ/AWQ (None: the text shipped with llmc)
    calib_samples: int = 32
    calib_seqlen: int = 256
    # perplexity and the quality gate (llmc/evaluate.py)
    eval_file: Path | None = None
    eval_tokens: int = 8192
    max_ppl_increase: float | None = None  # fraction, e.g. 0.05; with 4-bit --quant: a plan
    drift_tokens: int = 128  # calibration tokens each quantized matmul's drift is measured on
    plan: bool = True  # a 4-bit --quant with --max-ppl-increase plans each matmul's form
    # debugging: write the graph after these passes (names) into dump_dir
    dump_after: tuple[str, ...] = ()
    dump_dir: Path = Path("llmc-dumps")

    def describe(self) -> dict:
        return {
            "model": self.model or "SmolLM2-135M-Instruct (default)",
            "target": self.target,
            "out": str(self.out) if self.out else "artifacts/<model>-<target>",
            "verify": self.verify,
            "passes": self.passes or "all",
            "max_context": self.max_context or "model's",
            **({"draft_layers": self.draft_layers} if self.draft_layers else {}),
            **({"quant": self.quant} if self.quant else {}),
            **({"precision": self.precision} if self.precision else {}),
            **({"compat": self.compat} if self.compat else {}),
            **({"eval": str(self.eval_file)} if self.eval_file else {}),
        }

    def check(self) -> None:
        """Flag combinations that cannot work, refused before any heavy work (LlmcError)."""
        if self.max_ppl_increase is not None and self.eval_file is None and not self.planned:
            raise LlmcError(
                "--max-ppl-increase needs --eval FILE, the text to measure it on (or a 4-bit "
                "--quant, whose precision plan it sets)."
            )
        if self.eval_file is not None and not Path(self.eval_file).is_file():
            raise LlmcError(f"--eval {self.eval_file} is not a file; pass a UTF-8 text file.")
        if self.quant is None:
            if self.sym is not None or self.calib is not None:
                raise LlmcError(
                    "--sym/--asym and --calib only apply with --quant; add --quant int4."
                )
            return
        g = self.group_size
        if g and (g & (g - 1) or not 16 <= g <= 256):
            raise LlmcError(
                f"--group-size {g}: use a power of two from 16 to 256, or 0 for one group per row."
            )
        if self.calib is not None and not Path(self.calib).is_file():
            raise LlmcError(f"--calib {self.calib} is not a file; pass a UTF-8 text file.")
        if self.planned and self.sym is not None:
            raise LlmcError(
                "--sym/--asym fix one grid for every layer, but --max-ppl-increase with a 4-bit "
                "--quant plans each layer's form; drop --sym/--asym."
            )
        if self.planned and not self.drift_tokens:
            raise LlmcError(
                "--max-ppl-increase with a 4-bit --quant ranks layers by their measured drift; "
                "--drift-tokens 0 turns that off: drop it."
            )

    @property
    def planned(self) -> bool:
        """A 4-bit build whose layers' forms a precision plan chooses (--max-ppl-increase)."""
        four_bits = self.quant in ("int4", "gptq", "awq")
        return self.plan and self.max_ppl_increase is not None and four_bits

    def quant_config(self):
        """The QuantConfig of --quant/--group-size/--sym (None: fp32)."""
        if self.quant is None:
            return None
        from llmc.passes.quantize_weights import METHODS, QuantConfig

        if self.quant not in METHODS:
            raise LlmcError(f"--quant {self.quant}: choose one of {', '.join(METHODS)}.")
        budget = self.max_ppl_increase if self.planned else None
        return QuantConfig(
            self.quant,
            group=self.group_size,
            sym=self.sym,
            budget=budget,
            drift_tokens=self.drift_tokens,
        )
