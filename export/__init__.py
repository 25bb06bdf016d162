"""lowmag.export: export-student (ONNX, OpenVINO, TensorRT bundles and their parity gates)."""
