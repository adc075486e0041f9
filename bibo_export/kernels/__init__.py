"""BiBo's custom operators: PyTorch definitions (``moe_experts``) and the compiled ExecuTorch
kernels that implement them on device (``library``, built from ``csrc/`` by ``make setup``)."""
