"""ONNX target: export with torch.onnx (dynamo), run with onnxruntime."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """`llmc build --target onnx` options."""

    compat: str | None = None  # "onnxruntime-genai": onnxruntime-genai loads the artifact as it is

    def __post_init__(self):
        from llmc.compat import check_option

        check_option(self.compat, "onnx")
