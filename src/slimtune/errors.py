"""Errors a user can act on, each with its own process exit code.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
anything that is not a ``SlimtuneError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class SlimtuneError(Exception):
    """Base class: a failure caused by input or environment, not by a bug."""

    exit_code = 1


class UserInputError(SlimtuneError):
    """A flag, config file or argument is invalid."""

    exit_code = 2


class DataError(UserInputError):
    """A data file is unreadable or malformed; names the file and, when known, the line."""

    exit_code = 3

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ModelLoadError(SlimtuneError):
    """The model could not be found, fetched or loaded."""

    exit_code = 4


class DeltaError(SlimtuneError):
    """A delta is missing, corrupted, or does not belong to the base model."""

    exit_code = 5


class TrainingDivergedError(SlimtuneError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is
    kept."""

    exit_code = 6


EXIT_CODES: dict[str, int] = {
    "success": 0,
    "internal error (a bug: please report the traceback)": 1,
    UserInputError.__name__: UserInputError.exit_code,
    DataError.__name__: DataError.exit_code,
    ModelLoadError.__name__: ModelLoadError.exit_code,
    DeltaError.__name__: DeltaError.exit_code,
    TrainingDivergedError.__name__: TrainingDivergedError.exit_code,
    "interrupted (Ctrl-C)": 130,
}
