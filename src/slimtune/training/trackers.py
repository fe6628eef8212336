"""Experiment trackers (``--report-to tensorboard,wandb,trackio,mlflow``) through accelerate.

Each tracker gets the records of ``metrics.jsonl`` (their numeric fields, at their step),
the final evaluation metrics at the last step, and the run's options as hyperparameters.
Local logs go under ``RUN/logs``: TensorBoard's event files in ``RUN/logs/RUN_NAME``, wandb's
folder in ``RUN/logs``, mlflow's artifacts in ``RUN/logs`` (its tracking server or folder is
``MLFLOW_TRACKING_URI``'s, as usual; trackio keeps its own local store).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..errors import UserInputError

# --report-to name -> (module to import, pip package that provides it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


def parse_report_to(value: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``, each checked to be known and
    installed (accelerate would otherwise drop a missing one without a word)."""
    names = list(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise UserInputError(
                f"--report-to {name!r}: unknown tracker; use one or more of "
                f"{', '.join(TRACKERS)} (comma-separated)"
            )
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserInputError(
                f"--report-to {name}: the package {package!r} is not installed; "
                f"pip install {package}"
            )
    return names


def _hparams(options: dict[str, Any]) -> dict[str, Any]:
    """Options flattened to the scalar values every tracker accepts (``a.b`` for nested)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _hparams(value).items()})
        elif value is None or isinstance(value, (bool, int, float, str)):
            if value is not None:
                out[key] = value
        else:
            out[key] = json.dumps(value, default=str)
    return out


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record, except its step."""
    return {
        k: v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def accelerator_options(names: list[str], run_dir: Path) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` that route ``names`` to ``run_dir/logs``."""
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(run_dir / "logs")}


def start(accelerator, names: list[str], run_dir: Path, options: dict[str, Any]) -> None:
    """Open the trackers of an accelerator made with :func:`accelerator_options`."""
    if not names or not accelerator.is_main_process:  # the main process alone logs
        return
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kwargs = {"wandb": {"dir": str(logs)}, "mlflow": {"logging_dir": str(logs)}}
    accelerator.init_trackers(
        run_dir.resolve().name,
        config=_hparams(options),
        init_kwargs={n: kwargs[n] for n in names if n in kwargs},
    )


def finish(accelerator) -> None:
    """Close the trackers (``end_training`` would also end a distributed process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
