"""slimtune: resource-efficient fine-tuning of language models.

Public API::

    from slimtune import TrainConfig, train, load_model, load_dataset, evaluate, load_delta
"""

__version__ = "0.1.0"

from .data import load_dataset  # noqa: E402
from .delta import load_delta, read_manifest, save_delta, verify_delta  # noqa: E402
from .errors import SlimtuneError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .models import fetch_default_model, fingerprint, load_model  # noqa: E402
from .trainer import TrainConfig, TrainResult, train  # noqa: E402

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
