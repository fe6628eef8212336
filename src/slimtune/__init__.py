"""slimtune: resource-efficient fine-tuning of language models.

Public API::

    from slimtune import TrainConfig, train, load_model, load_dataset, evaluate, load_delta

Each name is imported on first use (``lazy.py``): ``import slimtune`` alone imports no torch.
"""

from typing import TYPE_CHECKING

from .lazy import exports
from .version import __version__

_WHERE = {
    "load_dataset": ".data",
    "load_delta": ".delta",
    "read_manifest": ".delta",
    "save_delta": ".delta",
    "verify_delta": ".delta",
    "SlimtuneError": ".errors",
    "evaluate": ".eval.evaluate",
    "fetch_default_model": ".model.loading",
    "fetch_model": ".model.loading",
    "fingerprint": ".model.loading",
    "load_model": ".model.loading",
    "TrainConfig": ".training.config",
    "TrainResult": ".training.trainer",
    "train": ".training.trainer",
}
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

if TYPE_CHECKING:  # a type checker reads each name from its module (and flags typos)
    from .data import load_dataset
    from .delta import load_delta, read_manifest, save_delta, verify_delta
    from .errors import SlimtuneError
    from .eval.evaluate import evaluate
    from .model.loading import fetch_default_model, fetch_model, fingerprint, load_model
    from .training.config import TrainConfig
    from .training.trainer import TrainResult, train
else:
    __getattr__, __dir__ = exports(__name__, _WHERE)
