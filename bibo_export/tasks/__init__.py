"""Tasks a model is trained and judged on: data, held-out sets and their metrics."""
