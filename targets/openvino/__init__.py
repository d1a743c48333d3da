"""OpenVINO target: convert the passed ExportedProgram with openvino.convert_model, make the KV
cache stateful, run it on OpenVINO's CPU plugin."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """`llmc build --target openvino` options."""

    precision: str = "f32"  # what the artifact runs at: f32 (exact) or bf16 (not verified)
    compat: str | None = None  # "openvino-genai": OpenVINO GenAI loads the artifact as it is

    def __post_init__(self):
        from llmc.compat import check_option
        from llmc.errors import TargetError

        if self.precision not in ("f32", "bf16"):
            raise TargetError(f"--precision {self.precision}: choose f32 or bf16.")
        check_option(self.compat, "openvino")
