"""Makes the trained sort-tiny's exports one after another, beside the test workers
(``helpers.start_trained_exports``): python tests/trained_exports.py SHARED CHECKPOINT."""

import sys
from pathlib import Path

from helpers import TRAINED_EXPORTS, make_trained_export

if __name__ == "__main__":
    shared, checkpoint = map(Path, sys.argv[1:3])
    for runtime, precision in TRAINED_EXPORTS:
        make_trained_export(shared, checkpoint, runtime, precision)
