"""Runtime models of TensorRT artifacts.

`Model` runs the engine (TensorRT's Python API, CUDA memory from torch): one execution context
per optimization profile, each step's shapes set with `set_input_shape`, its tensors bound with
`set_tensor_address`, run with `execute_async_v3`. Its sequences keep the KV cache in the concat
mode on the host (the ONNX target's ConcatKVSequence): simple and correct, not yet fast. Without
an engine (no TensorRT or no GPU where the artifact was built) it refuses to open, saying what is
needed. `VerifyModel` runs the same network in onnxruntime on the CPU: what `llmc build`
verifies against PyTorch, and what the tests run here.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

import numpy as np

from llmc.artifact_checks import inside
from llmc.errors import SessionError
from llmc.runtime.session import Model as BaseModel
from llmc.runtime.session import Sequence
from llmc.targets.onnx.session import ConcatKVSequence
from llmc.targets.onnx.session import Model as OnnxModel
from llmc.targets.tensorrt import engine as engine_files


class VerifyModel(OnnxModel):
    """The artifact's network in onnxruntime (CPU), exactly as written: no fast kernels (its
    quantized weights are DequantizeLinear + MatMul, the llmc op's own arithmetic). onnxruntime
    fuses a 4-bit DequantizeLinear and its MatMul into MatMulNBits, by default with int8
    activations (|Δlogits| 0.07 on a tiny llama): level 0 keeps that fusion exact."""

    session_config: ClassVar[dict[str, str]] = {"session.qdq_matmulnbits_accuracy_level": "0"}

    def __init__(self, directory, manifest: dict, options=None):
        options = options if options is not None else self.Options()
        super().__init__(directory, manifest, dataclasses.replace(options, exact=True))


class Model(BaseModel):  # pragma: no cover - needs TensorRT and a GPU, absent here
    """A TensorRT engine; profile 0 runs prompts, profile 1 decode and short extend steps."""

    short_extend = engine_files.DECODE_STEP

    def __init__(self, directory, manifest: dict, options=None):
        super().__init__(directory, manifest, options)
        if self.io.recurrent:
            raise SessionError(
                f"{self.directory} is a recurrent (state-space) network: its engine's runtime is "
                "not written yet; run the same model with --target onnx or openvino."
            )
        target = manifest["target"]
        name = target.get("engine")
        if name:
            inside(self.directory, name, "its TensorRT engine")  # never a file elsewhere
        if not name or not (self.directory / name).is_file():
            why = target.get("engine_missing_reason") or "no engine was built"
            raise SessionError(
                f"{self.directory} holds a TensorRT network but no engine ({why}): "
                + engine_files.NEEDS.format(
                    version=target.get("tensorrt_min_version", "10.15"),
                    spec=self.directory / engine_files.SPEC_FILE,
                )
            )
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise SessionError("running a TensorRT engine needs an NVIDIA GPU; none is visible.")
        self._torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine((self.directory / name).read_bytes())
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(context)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = {n for n in names if self.engine.get_tensor_mode(n) == mode}
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.torch_dtypes = {
            n: torch.from_numpy(np.empty(0, d)).dtype for n, d in self.dtypes.items()
        }
        self.last_only = False
        self.lock = threading.Lock()  # one execution context per profile: steps in turn

    def sequence(self) -> Sequence:
        return ConcatKVSequence(self)

    def session_for(self, tokens: int, live: bool, join: bool = False, total: int = 0):
        decode = live and tokens <= engine_files.DECODE_STEP and len(self.contexts) > 1
        return self.contexts[1 if decode else 0], None

    def run(self, context, names, feeds):
        """onnxruntime's `run(names, feeds)` on the engine: numpy in, numpy out."""
        torch = self._torch
        with self.lock, torch.cuda.stream(self.stream):
            held = []
            for name, array in feeds.items():
                tensor = torch.from_numpy(array.astype(self.dtypes[name], copy=False)).cuda()
                held.append(tensor)
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in names:
                shape = tuple(context.get_tensor_shape(name))
                dtype = self.torch_dtypes[name]
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise SessionError("TensorRT could not run the step (see its log).")
            self.stream.synchronize()
            return [outputs[name].cpu().numpy() for name in names]
