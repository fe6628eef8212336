"""slimtune: resource-efficient fine-tuning of language models.

Public API::

    from slimtune import TrainConfig, train, load_model, load_dataset, evaluate, load_delta
"""

__version__ = "0.1.0"

from .data import load_dataset
from .delta import load_delta, read_manifest, save_delta, verify_delta
from .errors import SlimtuneError
from .evaluation import evaluate
from .models import fetch_default_model, fingerprint, load_model
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "SlimtuneError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate",
    "fetch_default_model",
    "fingerprint",
    "load_dataset",
    "load_delta",
    "load_model",
    "read_manifest",
    "save_delta",
    "train",
    "verify_delta",
]
