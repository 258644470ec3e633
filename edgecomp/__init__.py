"""edgecomp: prepare PyTorch models for mobile and edge CPUs.

Export to ONNX (:mod:`edgecomp.export`), transform the graph with passes
(:mod:`edgecomp.passes`), and check latency and fidelity with onnxruntime
(:mod:`edgecomp.measure.bench`, :mod:`edgecomp.measure.validate`).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
