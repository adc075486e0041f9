"""bibo-export: train BiBo on TPU with torch_xla, export it to ONNX and ExecuTorch, prove parity."""

__version__ = "0.1.0"
