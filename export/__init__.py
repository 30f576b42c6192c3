"""vitslim.export: (dense model, plan) -> physically slim module -> ONNX -> graph passes, parity
and report. Reads plans from vitslim.pruning; never imports vitslim.deploy."""
