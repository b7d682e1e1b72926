"""trainkit: train, evaluate and serve image classifiers with PyTorch from one YAML file."""

__version__ = "0.1.0"
