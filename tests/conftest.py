import json
import os
from pathlib import Path

import pytest
import torch

from slimtune.model.loading import load_model
from slimtune.testing import tiny_model_dir

LABELS = ["billing", "shipping", "returns"]
# the files that take longest, first: `make test` runs two pytest-xdist workers, each taking
# whole files in this order (--dist loadfile --no-loadscope-reorder), and a long file sent
# last would leave one worker idle. A quick file third: xdist gives a worker another file
# while it has two tests or fewer pending, so the README's worker takes the third at once,
# and it waits behind the README's examples.
LONGEST_FIRST = ("test_readme.py", "test_multiprocess.py", "test_layout.py", "test_compile.py")


def pytest_configure(config):
    """Under pytest-xdist each worker (and the commands its tests start) gets its share of
    the cores: torch's threads spin while they wait, and two workers' threads on the same
    cores slow both."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True, scope="session")
def _private_store(tmp_path_factory):
    """Commands that save into the delta store write into a temporary one, never ~/.local."""
    os.environ["SLIMTUNE_STORE"] = str(tmp_path_factory.mktemp("store"))
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_model(str(tiny_dir))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def intent_rows(n: int = 48):
    """A learnable toy task: the label word appears in the message."""
    words = {
        "billing": "charged card refund",
        "shipping": "parcel tracking late",
        "returns": "return label refund box",
    }
    rows = []
    for i in range(n):
        lab = LABELS[i % 3]
        rows.append({"prompt": f"Message: {words[lab]} {i}\nIntent:", "completion": f" {lab}"})
    return rows


@pytest.fixture
def intent_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "intents.jsonl", intent_rows())


def train_tiny(model_dir: Path, data: Path, out: Path, **overrides):
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    opts = dict(
        model=str(model_dir),
        data=str(data),
        output_dir=str(out),
        max_steps=6,
        batch_size=4,
        lr=1e-2,
        eval_fraction=0.25,
        progress=False,
        device="cpu",
        save_every=0,
    )
    opts.update(overrides)
    return train(TrainConfig(**opts))


def count_calls(monkeypatch, *functions) -> list[str]:
    """The names of the autograd ``functions`` called from now on, one entry per call (the
    call itself runs as before): which path a step took."""
    calls: list[str] = []
    for function in functions:
        apply = function.apply
        monkeypatch.setattr(
            function, "apply", lambda *a, f=apply, n=function.__name__: calls.append(n) or f(*a)
        )
    return calls
