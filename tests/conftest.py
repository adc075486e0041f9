import os

# torch_xla tests run on its CPU backend unless the caller chose a device (a TPU VM).
os.environ.setdefault("PJRT_DEVICE", "CPU")

try:
    # Must precede the first backward of the session: the autograd engine sizes its per-device
    # queues then, and an XLA device registered later trips an internal assert.
    import torch_xla  # noqa: F401
except ImportError:  # the export env has no torch_xla; its tests deselect the xla marker
    pass
