"""TensorRT target: a standard-ONNX network (opset 23, no vendor ops) that TensorRT's ONNX parser
takes, its build spec (profiles, precision, workspace, the `trtexec` command), and the engine
where TensorRT and an NVIDIA GPU exist. The network is verified in onnxruntime at build time."""
