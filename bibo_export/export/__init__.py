"""Exporters: prepare → export → quantize → lower → save → verify, for ONNX and ExecuTorch."""
