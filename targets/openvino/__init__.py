"""OpenVINO target: convert the passed ExportedProgram with openvino.convert_model, make the KV
cache stateful, run it on OpenVINO's CPU plugin."""
