"""Training BiBo: data, the compiled train step, checkpoints and the training loop."""
