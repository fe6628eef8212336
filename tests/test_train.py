import gc
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from safetensors.torch import load_file

from slimtune.errors import TrainingDivergedError, UserInputError
from slimtune.training.config import TrainConfig
from slimtune.training.step import steady_gc
from slimtune.training.trainer import Trainer

from .conftest import train_tiny, write_jsonl


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_lowers_the_loss_and_writes_a_delta(tiny_dir, intent_file, tmp_path, method):
    res = train_tiny(tiny_dir, intent_file, tmp_path / "run", method=method, max_steps=12)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25
    assert (res.delta_dir / "manifest.json").exists()
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    s = res.summary
    assert 0 < s["trainable_params"] <= s["total_params"]
    assert s["eval_accuracy"] is not None and s["peak_memory_bytes"] > 0
    assert not (tmp_path / "run" / "checkpoint").exists()  # removed after success


def test_grad_accumulation_matches_the_big_batch(tiny_dir, intent_file, tmp_path):
    """Batch 5 x 3 accumulated and batch 15 see the same examples in every step, across
    an epoch's end too (48 examples: steps of 15, 15, 15, 3, then the next epoch); the
    micro-batches were cut from the epoch, so a step straddled two epochs."""
    runs = [
        train_tiny(
            tiny_dir,
            intent_file,
            tmp_path / f"b{batch}",
            method="lora",
            max_steps=6,
            batch_size=batch,
            grad_accum=ga,
            eval_fraction=0.0,
            lr=1e-2,
            method_options={"dropout": 0.0},
        )
        for batch, ga in ((15, 1), (5, 3))
    ]
    big, accumulated = ([h["loss"] for h in r.history] for r in runs)
    assert len(big) == 6 and accumulated == pytest.approx(big, rel=1e-5)
    a, b = (load_file(r.delta_dir / "adapter_model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error(tiny_dir, intent_file, tmp_path):
    cfg = TrainConfig(
        model=str(tiny_dir),
        data=str(intent_file),
        output_dir=str(tmp_path / "r"),
        max_steps=4,
        batch_size=4,
        progress=False,
        device="cpu",
        save_every=1,
    )
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[0, 0] = math.nan
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 1 .*data lines \["):
        trainer.run()
    log = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert '"diverged"' in log


def test_existing_run_is_not_overwritten_silently(tiny_dir, intent_file, tmp_path):
    train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    with pytest.raises(UserInputError, match="already holds a finished run"):
        train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1, overwrite=True)


def test_an_overwrite_that_cannot_start_keeps_the_run_it_would_replace(
    tiny_dir, intent_file, tmp_path
):
    from pathlib import Path

    from slimtune.errors import DataError

    run = tmp_path / "r"
    train_tiny(tiny_dir, intent_file, run, max_steps=2, save_every=1, keep_checkpoint=True)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert (run / "delta" / "manifest.json") in {run / p for p in before}
    assert (run / "checkpoint" / "checkpoint.json") in {run / p for p in before}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}])  # no completion
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        train_tiny(tiny_dir, bad, run, max_steps=1, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # delta, checkpoint and log as they were
    # one that starts replaces it: the old checkpoint and log are gone, a new delta is there
    train_tiny(tiny_dir, intent_file, run, max_steps=1, overwrite=True)
    assert not (run / "checkpoint").exists()
    assert [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ] == [1]
    assert (run / "delta" / "manifest.json").read_bytes() != before[Path("delta/manifest.json")]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import slimtune.training.trainer as T
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train
    original = T.write_json
    def write_json(path, obj):
        # die in the middle of writing the 4th checkpoint: its tensors are written,
        # its metadata not; the step-3 checkpoint must survive
        if path.name == "checkpoint.json" and obj.get("step") == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, obj)
    T.write_json = write_json
    model, data, out, resume = sys.argv[1:5]
    train(TrainConfig(model=model, data=data, output_dir=out, max_steps=7, batch_size=4,
                      lr=1e-2, progress=False, device="cpu", save_every=1,
                      resume=resume == "1", method="lora",
                      method_options={"dropout": 0.1}))
""")


def test_resume_after_kill_gives_the_same_weights(tiny_dir, intent_file, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    clean = tmp_path / "clean.py"
    clean.write_text(KILL_SCRIPT.replace("T.write_json = write_json", ""))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(path, out, resume):
        return subprocess.run(
            [sys.executable, str(path), str(tiny_dir), str(intent_file), str(out), resume],
            env=env,
            capture_output=True,
            text=True,
        )

    killed = run(script, tmp_path / "k", "0")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "k" / "delta").exists()
    ckpt = json.loads((tmp_path / "k" / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["step"] == 3
    resumed = run(clean, tmp_path / "k", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr
    whole = run(clean, tmp_path / "w", "0")
    assert whole.returncode == 0, whole.stderr
    a = load_file(str(tmp_path / "k" / "delta" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "w" / "delta" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 8))


def test_resume_refuses_changed_options(tiny_dir, intent_file, tmp_path):
    cfg = TrainConfig(
        model=str(tiny_dir),
        data=str(intent_file),
        output_dir=str(tmp_path / "r"),
        max_steps=4,
        batch_size=4,
        progress=False,
        device="cpu",
        save_every=1,
    )
    t = Trainer(cfg)
    t.save_checkpoint()
    t.close()
    cfg2 = TrainConfig(**{**cfg.__dict__, "lr": 0.5, "resume": True})
    with pytest.raises(UserInputError, match=r"cannot resume, the run differs in \['lr'\]"):
        Trainer(cfg2)
    # fewer steps than the checkpoint has done: named as such, not as a damaged checkpoint
    # with advice to replace it
    meta_path = tmp_path / "r" / "checkpoint" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["step"] = 3
    meta_path.write_text(json.dumps(meta))
    fewer = TrainConfig(**{**cfg.__dict__, "max_steps": 2, "resume": True})
    with pytest.raises(UserInputError, match=r"differs in \['max_steps'\]") as refused:
        Trainer(fewer)
    assert "unreadable" not in str(refused.value)
    meta["step"] = 9  # past the recorded max_steps (4): that file is damaged
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=r"unreadable checkpoint .*step 9 is past"):
        Trainer(TrainConfig(**{**cfg.__dict__, "resume": True}))
    meta["step"] = 0
    meta_path.write_text(json.dumps(meta))
    write_jsonl(tmp_path / "other.jsonl", [{"text": "different data"}] * 4)
    cfg3 = TrainConfig(**{**cfg.__dict__, "resume": True})
    Trainer(cfg3)  # same options: accepted


class _Stop(Exception):
    pass


def stop_after_checkpoint(cfg: TrainConfig, step: int) -> None:
    """Run ``cfg`` until its checkpoint at ``step`` is written, then stop (a kill-free
    stand-in for an interrupted run)."""

    class Stopping(Trainer):
        def save_checkpoint(self) -> None:
            super().save_checkpoint()
            if self.step == step:
                raise _Stop

    with pytest.raises(_Stop):
        Stopping(cfg).run()


def tiny_cfg(tiny_dir, data, out, **overrides) -> TrainConfig:
    opts = dict(
        model=str(tiny_dir),
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
    return TrainConfig(**{**opts, **overrides})


def test_a_one_step_run_trains(tiny_dir, intent_file, tmp_path):
    # the default warmup (10%) must not make the only step run at lr 0
    res = train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    assert res.history[0]["lr"] > 0
    b = load_file(str(res.delta_dir / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in b.items())
    res = train_tiny(tiny_dir, intent_file, tmp_path / "w", max_steps=10, warmup_ratio=0.5)
    lrs = [h["lr"] for h in res.history]
    assert all(lr > 0 for lr in lrs) and max(lrs) == pytest.approx(1e-2)


def poisoned(cfg: TrainConfig, at_step: int) -> Trainer:
    """A trainer whose optimizer step number ``at_step`` leaves a NaN in the weights with a
    finite loss and gradient (what an overflowing lr does on a GPU)."""
    trainer = Trainer(cfg)
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        if trainer.step + 1 == at_step:
            with torch.no_grad():
                trainer.params[-1].view(-1)[0] = math.nan
        return out

    trainer.optimizer.step = step
    return trainer


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)`")
def test_non_finite_weights_are_never_saved(tiny_dir, intent_file, tmp_path):
    with pytest.raises(
        TrainingDivergedError,
        match=r"weights became nan at step 1 .*"
        r"no checkpoint was written yet",
    ):
        poisoned(tiny_cfg(tiny_dir, intent_file, tmp_path / "a", max_steps=1), 1).run()
    assert not (tmp_path / "a" / "delta").exists()
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "b", max_steps=4, save_every=1)
    with pytest.raises(
        TrainingDivergedError,
        match=r"weights became nan at step 3 .*last good "
        r"checkpoint .*--resume and a lower --lr",
    ):
        poisoned(cfg, 3).run()
    meta = json.loads((tmp_path / "b" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 2
    saved = load_file(str(tmp_path / "b" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "b" / "delta").exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", math.inf),
        ("max_grad_norm", math.nan),
        ("weight_decay", -math.inf),
        ("warmup_ratio", math.nan),
        ("seed", -1),
        ("max_grad_norm", 0.0),
    ],
)
def test_non_finite_or_out_of_range_options_are_refused(field, value):
    with pytest.raises(UserInputError, match=field):
        TrainConfig(data="x.jsonl", **{field: value}).validated()


def test_resume_with_a_lower_lr_follows_the_divergence_advice(tiny_dir, intent_file, tmp_path):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", save_every=2, warmup_ratio=0.0)
    stop_after_checkpoint(cfg, 2)
    higher = TrainConfig(**{**cfg.__dict__, "lr": 2e-2, "resume": True})
    with pytest.raises(UserInputError, match=r"differs in \['lr'\]"):
        Trainer(higher)
    res = Trainer(
        TrainConfig(**{**cfg.__dict__, "lr": 5e-3, "max_grad_norm": 0.5, "resume": True})
    ).run()
    whole = train_tiny(tiny_dir, intent_file, tmp_path / "w", warmup_ratio=0.0)
    lr = {h["step"]: h["lr"] for h in res.history if "lr" in h}
    lr_whole = {h["step"]: h["lr"] for h in whole.history}
    assert lr[2] == lr_whole[2]  # before the resume: unchanged
    assert all(lr[s] == pytest.approx(lr_whole[s] / 2) for s in (3, 4, 5, 6))
    change = {
        "step": 2,
        "event": "resumed",
        "changed": {"lr": [1e-2, 5e-3], "max_grad_norm": [1.0, 0.5]},
    }
    assert change in [
        json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert res.manifest["resume_changes"] == [change]


def test_a_resume_that_never_checkpointed_leaves_no_stale_change_record(
    tiny_dir, intent_file, tmp_path
):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", save_every=2, warmup_ratio=0.0)
    stop_after_checkpoint(cfg, 2)

    class StopBeforeSaving(Trainer):
        def save_checkpoint(self) -> None:
            raise _Stop

    # resumed with a lower lr, stopped again before its next checkpoint: the step-2
    # checkpoint still holds the original run, so that change never took effect
    with pytest.raises(_Stop):
        StopBeforeSaving(TrainConfig(**{**cfg.__dict__, "lr": 5e-3, "resume": True})).run()
    res = Trainer(TrainConfig(**{**cfg.__dict__, "resume": True})).run()
    assert res.manifest["resume_changes"] == []
    log = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("event") == "resumed"]


def test_resume_refuses_a_finished_or_missing_run(tiny_dir, intent_file, tmp_path):
    train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    with pytest.raises(UserInputError, match=r"holds a finished run .*nothing to resume"):
        train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1, resume=True)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(UserInputError, match="holds no checkpoint to resume"):
        train_tiny(tiny_dir, intent_file, tmp_path / "k", max_steps=1, resume=True)
    # a new (or empty) folder: --resume starts from step 0, so a retry loop can always pass it
    res = train_tiny(tiny_dir, intent_file, tmp_path / "new", max_steps=1, resume=True)
    assert res.summary["steps"] == 1


def test_a_fresh_run_does_not_append_to_a_dead_runs_metrics(tiny_dir, intent_file, tmp_path):
    # exit 6 before the first checkpoint says "run again with a lower --lr": that run's
    # metrics.jsonl is its own, not the dead run's lines followed by its own
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "event": "diverged", "loss": NaN}\n')
    train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=2)
    log = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and not any("event" in r for r in log)


def test_the_output_folder_is_locked_and_leaked_temporaries_are_removed(
    tiny_dir, intent_file, tmp_path
):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    leaked = tmp_path / "r" / ".checkpoint.abc123.tmp"
    leaked.mkdir(parents=True)
    (leaked / "trainable.safetensors").write_bytes(b"half")
    first = Trainer(cfg)
    assert not leaked.exists()
    with pytest.raises(UserInputError, match="another slimtune process is training into"):
        Trainer(cfg)
    first.run()  # releases the folder when it ends
    Trainer(TrainConfig(**{**cfg.__dict__, "overwrite": True})).close()


def test_a_refused_run_releases_the_output_folder(tiny_dir, intent_file, tmp_path):
    from slimtune.fileio import file_lock

    train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    # the error, kept (as a notebook or a retry loop keeps it), must not keep the lock
    with pytest.raises(UserInputError, match="already holds a finished run") as refused:
        train_tiny(tiny_dir, intent_file, tmp_path / "r", max_steps=1)
    with file_lock(tmp_path / "r" / ".lock", wait=False):
        pass
    assert refused.value is not None


PLANT = textwrap.dedent("""
    import os, sys, torch
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (sys.argv[2],))
    torch.save({"optimizer": Evil()}, sys.argv[1])
""")


def test_a_planted_checkpoint_pickle_runs_no_code(tiny_dir, intent_file, tmp_path):
    cfg = tiny_cfg(tiny_dir, intent_file, tmp_path / "r", save_every=2)
    stop_after_checkpoint(cfg, 2)
    marker = tmp_path / "pwned"
    plant = tmp_path / "plant.py"
    plant.write_text(PLANT)
    state = tmp_path / "r" / "checkpoint" / "state.pt"
    subprocess.run([sys.executable, str(plant), str(state), str(marker)], check=True)
    resume = TrainConfig(**{**cfg.__dict__, "resume": True})
    with pytest.raises(UserInputError, match="unreadable checkpoint"):
        Trainer(resume)
    assert not marker.exists()
    # the identity in checkpoint.json is checked before any tensor is read
    meta = json.loads((tmp_path / "r" / "checkpoint" / "checkpoint.json").read_text())
    meta["identity"]["seed"] = 99
    (tmp_path / "r" / "checkpoint" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=r"differs in \['seed'\]"):
        Trainer(resume)
    assert not marker.exists()


def test_python_api_options_are_type_checked_too(tmp_path):
    cfg = TrainConfig(data=tmp_path / "a.jsonl", output_dir=tmp_path / "r", lr="2e-3").validated()
    assert (cfg.data, cfg.output_dir, cfg.lr) == (
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "r"),
        0.002,
    )
    with pytest.raises(UserInputError, match="field 'overwrite' must be true or false"):
        TrainConfig(data="a.jsonl", overwrite="false").validated()


def test_python_api_takes_numpy_numbers(tmp_path):
    # a grid from numpy gives np.int64/np.float32: integers and numbers to a user; they
    # become plain ones (the identity and the manifest are JSON)
    import numpy as np

    cfg = TrainConfig(
        data="a.jsonl", max_steps=np.int64(5), lr=np.float32(0.5), seed=np.int32(3)
    ).validated()
    assert (cfg.max_steps, cfg.lr, cfg.seed) == (5, 0.5, 3)
    assert (type(cfg.max_steps), type(cfg.lr), type(cfg.seed)) == (int, float, int)
    json.dumps(cfg.identity())
    with pytest.raises(UserInputError, match="field 'max_steps' must be an integer"):
        TrainConfig(data="a.jsonl", max_steps=np.float64(5.0)).validated()


def test_steady_gc_freezes_what_exists_and_still_collects_new_garbage():
    from slimtune.training import step

    start = gc.get_freeze_count()
    assert start <= step._INTERPRETER_FROZEN  # nothing in the test process froze the heap

    class Node:
        pass

    with steady_gc():
        frozen = gc.get_freeze_count()
        assert frozen > start
        cycle = Node()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None  # a cycle made while frozen is still collected
        with steady_gc():
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() >= frozen  # the inner use did not thaw the outer
    assert gc.get_freeze_count() == 0
    gc.freeze()  # someone else's freeze is theirs to undo
    try:
        before = gc.get_freeze_count()
        with steady_gc():
            pass
        assert gc.get_freeze_count() >= before > 0
    finally:
        gc.unfreeze()


def test_steady_gc_thaws_a_heap_the_interpreter_started_frozen(monkeypatch):
    # CPython 3.12 starts with a few hundred objects frozen; a helper that took any freeze
    # for someone else's never thawed there, leaving every object frozen for good
    from slimtune.training import step

    gc.freeze()
    try:
        monkeypatch.setattr(step, "_INTERPRETER_FROZEN", gc.get_freeze_count())
        with steady_gc():
            pass
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_the_training_steps_run_on_a_frozen_heap_thawed_after(tiny_dir, intent_file, tmp_path):
    # a full collection inside a host-bound GPU step made it up to 3.6x the median
    from slimtune.training import step

    trainer = Trainer(tiny_cfg(tiny_dir, intent_file, tmp_path / "r", max_steps=3))
    counts = []
    original = trainer.method.on_step_end

    def on_step_end(*args):
        counts.append(gc.get_freeze_count())
        return original(*args)

    trainer.method.on_step_end = on_step_end
    trainer.run()
    # the model's objects and the libraries', beyond what CPython 3.12 starts with frozen
    assert len(counts) == 3 and min(counts) > step._INTERPRETER_FROZEN + 10_000
    assert gc.get_freeze_count() == 0


def test_adamw_is_fused_only_where_torch_takes_every_tensor(monkeypatch):
    from slimtune.training import step

    p = torch.nn.Parameter(torch.zeros(3))
    assert not step.fused_adamw_fits([p])  # a CPU run keeps torch's default path
    assert not step.fused_adamw_fits([])
    group = {"params": (x for x in [p]), "weight_decay": 0.0}  # a generator, as torch takes
    opt = step.adamw([group], 1e-3)
    assert not opt.defaults["fused"] and opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[0]["params"] == [p] and "lr" not in group  # the caller's as given
    # on CUDA tensors the factory asks torch for its fused kernel
    monkeypatch.setattr(step, "fused_adamw_fits", lambda tensors: True)
    seen = {}
    monkeypatch.setattr(
        step.torch.optim, "AdamW", lambda groups, lr, fused: seen.update(fused=fused, lr=lr)
    )
    step.adamw([p], 2e-3)
    assert seen == {"fused": True, "lr": 2e-3}


def test_a_resumed_run_steps_with_its_own_adamw_kernel_not_the_checkpoints():
    # a checkpoint written on CUDA holds fused=True; a run resumed on a device without
    # that kernel must take its own choice, and keep the moments it saved
    from slimtune.training.parallel import Parallel, StepLoss

    def run() -> tuple[Parallel, torch.optim.Optimizer]:
        torch.manual_seed(0)
        par = Parallel("none", StepLoss(torch.nn.Linear(3, 2)))
        groups = [{"params": list(par.step.parameters()), "weight_decay": 0.0}]
        return par, torch.optim.AdamW(groups, lr=1e-3, foreach=False)

    par, opt = run()
    par.step.model.weight.sum().backward()
    opt.step()
    saved = par.optimizer_state(opt)
    saved["param_groups"][0].update(fused=True, foreach=True)  # as another run wrote it
    par2, opt2 = run()
    par2.load_optimizer_state(opt2, saved)
    assert not opt2.param_groups[0]["fused"] and opt2.param_groups[0]["foreach"] is False
    assert saved["param_groups"][0]["fused"] is True  # the caller's state is left as it was
    moments = opt2.state[par2.step.model.weight]["exp_avg"]
    assert torch.equal(moments, opt.state[par.step.model.weight]["exp_avg"])
    par2.step.model.weight.sum().backward()
    opt2.step()  # and it steps


def test_eval_data_the_evaluation_cannot_read_is_refused_before_training(
    tiny_dir, intent_file, tmp_path
):
    from slimtune.errors import DataError

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain words"}] * 4)
    with pytest.raises(DataError, match=r"text\.jsonl: holds text records, the training data"):
        train_tiny(tiny_dir, intent_file, tmp_path / "r", eval_data=str(text))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no step was trained
    with pytest.raises(UserInputError, match="task classification reads prompt_completion"):
        train_tiny(tiny_dir, text, tmp_path / "t", task="classification")
    with pytest.raises(UserInputError, match="task must be one of auto, classification"):
        TrainConfig(data="a.jsonl", task="Classification").validated()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_freezing_every_layer_is_refused_for_every_method(tiny_dir, intent_file, tmp_path, method):
    """full with every layer frozen trained the final norm alone, without a word."""
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(tiny_dir).num_hidden_layers
    with pytest.raises(UserInputError, match=f"the model has {n} layers .* none would be left"):
        train_tiny(tiny_dir, intent_file, tmp_path / method, method=method, freeze_below=n)
    res = train_tiny(tiny_dir, intent_file, tmp_path / "top", method=method, freeze_below=n - 1)
    assert res.manifest["layers"] == [n - 1]
