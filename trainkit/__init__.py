"""trainkit: train, evaluate and serve image classifiers with PyTorch from one YAML file.

The Python API (see trainkit.api; importing trainkit itself stays light):

    import trainkit
    run = trainkit.train("configs/quickstart.yaml", overrides={"train.epochs": 2})
    metrics = trainkit.evaluate(run.best_checkpoint)
    predictions = trainkit.predict(run.best_checkpoint, ["cat.png"])
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

_API = ("train", "evaluate", "predict")


def train(config, overrides=None, callbacks=(), **options):
    """Train a run; → trainkit.api.TrainResult. See trainkit.api.train."""
    from trainkit.api import train as run

    return run(config, overrides, callbacks, **options)


def evaluate(checkpoint, **options):
    """Score a checkpoint on a split; → a dict of metrics. See trainkit.api.evaluate."""
    from trainkit.api import evaluate as run

    return run(checkpoint, **options)


def predict(checkpoint, images, **options):
    """Classify images; → one dict per image. See trainkit.api.predict."""
    from trainkit.api import predict as run

    return run(checkpoint, images, **options)


class _Package(types.ModuleType):
    """Modules named like the API functions exist (trainkit/train.py, evaluate.py, predict.py,
    the CLI verbs' homes). Importing one would rebind the package attribute to the module;
    here the functions stay, and `from trainkit.predict import run_predict` still finds the
    module in sys.modules."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
