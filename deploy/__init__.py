"""vitslim.deploy: engines from ONNX, runners, comparison, benchmarks and the latency gate.

Imports neither vitslim.pruning nor vitslim.export nor timm (only numpy and vitslim's leaf modules
at import time); onnx, onnxruntime, torch and TensorRT are imported inside the functions that use
them, so deploy/ works where only numpy and TensorRT are installed."""
