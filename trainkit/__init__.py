"""trainkit: train, evaluate and serve image classifiers with PyTorch from one YAML file."""

__version__ = "0.1.0"

import time as _time

# When this process started trainkit; the first training step is reported relative to it.
STARTED = _time.perf_counter()
