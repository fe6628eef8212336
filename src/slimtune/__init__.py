"""slimtune: resource-efficient fine-tuning of language models.

Public API::

    from slimtune import TrainConfig, train, load_model, load_dataset, evaluate, load_delta
"""

from .data import load_dataset
from .delta import load_delta, read_manifest, save_delta, verify_delta
from .errors import SlimtuneError
from .eval.evaluate import evaluate
from .model.loading import fetch_default_model, fetch_model, fingerprint, load_model
from .training.config import TrainConfig
from .training.trainer import TrainResult, train
from .version import __version__

__all__ = [
    "SlimtuneError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate",
    "fetch_default_model",
    "fetch_model",
    "fingerprint",
    "load_dataset",
    "load_delta",
    "load_model",
    "read_manifest",
    "save_delta",
    "train",
    "verify_delta",
]
