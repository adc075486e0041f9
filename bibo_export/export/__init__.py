"""Exporters: one pipeline of named stages (pipeline.py) and a recipe per backend (onnx.py, executorch.py)."""
