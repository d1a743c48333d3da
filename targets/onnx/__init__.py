"""ONNX target: export with torch.onnx (dynamo), run with onnxruntime."""
