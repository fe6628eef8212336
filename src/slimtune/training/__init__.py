"""The training stage: options, the loop, one optimizer step, the loss, sweeps, trackers.

``config.py`` (TrainConfig) -> ``trainer.py`` (the loop, checkpoints, resume) runs
``step.py`` (accumulate, clip, schedule) on ``loss.py`` (the target-only chunked loss);
``sweep.py`` runs a grid of trainings; ``trackers.py`` forwards metrics to trackers.
"""
