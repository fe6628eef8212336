"""The evaluation tasks by name, and the record shape each reads: torch-free, so the
command line's parsers and a config's checks can name them without loading a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserInputError

if TYPE_CHECKING:
    from ..data import Dataset

TASKS = ("auto", "classification", "generation", "chat", "lm")
# the record shape each task reads (lm reads any: the loss of every target token)
TASK_SHAPES = {
    "classification": "prompt_completion",
    "generation": "prompt_completion",
    "chat": "messages",
}


def check_task(task: str, dataset: Dataset | None = None) -> None:
    """A task slimtune evaluates, and (given the data) one its records can be read for: a
    typo would otherwise fall through to the loss alone, a mismatch to a KeyError."""
    if task not in TASKS:
        raise UserInputError(f"task {task!r}: use one of {', '.join(TASKS)}")
    need = TASK_SHAPES.get(task)
    if dataset is not None and need is not None and dataset.shape != need:
        raise UserInputError(
            f"task {task} reads {need} records; {dataset.path} holds {dataset.shape} records"
        )
