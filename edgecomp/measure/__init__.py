"""Measurement with onnxruntime, on files or in-memory models: latency (bench), fidelity and
accuracy (validate), parameters, MACs and sizes (inspect)."""
