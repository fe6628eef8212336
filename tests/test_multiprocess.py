"""Several processes on the CPU (gloo): torchrun and accelerate launch.

Two processes of batch 2 must train the weights one process of batch 4 trains (the global
batch is the same), write every file once and add one store version.
"""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune.model.compile as compile_mod
from slimtune.cli.app import main
from slimtune.delta import DeltaStore

# a launch that has not finished by then hangs (a rank waiting for a peer that died): the
# slowest takes about 2 minutes alone on 2 cores, more beside another test worker
HANG = 600
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# accelerate launch --cpu runs one process whatever --num_processes says (accelerate starts
# several CPU processes only through mpirun with a hostfile); --multi_gpu goes through
# torchrun, and --device cpu makes the processes gloo ones
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def _train_args(model: Path, data: Path, out: Path, store: Path, method: str, batch: int):
    args = ["train", "--model", str(model), "--data", str(data), "--method", method]
    # 37 training examples: the epoch's last global batch holds one, so the second process
    # gets none at step 10, and step 11 starts the next epoch
    args += ["--device", "cpu", "--max-steps", "11", "--batch-size", str(batch), "--seed", "3"]
    args += ["--eval-fraction", "0.23", "--save-every", "0", "--no-progress"]
    args += ["--output-dir", str(out), "--store", str(store)]
    args += ["--lr", "1e-4"] if method == "full" else []  # not a range test: a rate
    return args + (["--lora-dropout", "0"] if method == "lora" else [])


def _launch(
    launcher: list[str], args: list[str], port: int, tmp: Path
) -> subprocess.CompletedProcess:
    """Run ``slimtune args`` under ``launcher``; the launcher's temporary folders (torchrun
    makes one per launch) go under ``tmp``, the test's own, not the machine's /tmp."""
    (tmp / "launcher-tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(tmp / "launcher-tmp")
    if launcher is TORCHRUN:
        launcher = [*launcher, "--master_port", str(port)]
    else:
        launcher = [*launcher, "--main_process_port", str(port)]
    return subprocess.run(
        [*launcher, "-m", "slimtune", *args], capture_output=True, text=True, env=env, timeout=HANG
    )


def _weights(delta: Path) -> dict[str, torch.Tensor]:
    files = sorted(delta.glob("*.safetensors"))
    assert files, f"no weights in {delta}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize(
    "launcher,method,extra",
    [
        (TORCHRUN, "lora", []),
        (TORCHRUN, "sparse", []),
        (TORCHRUN, "sparse", ["--regrow-every", "3"]),
        (TORCHRUN, "full", []),
        (ACCELERATE, "lora", []),
        (TORCHRUN, "full", ["--fsdp"]),
        (TORCHRUN, "lora", ["--fsdp"]),
        (TORCHRUN, "lora", ["--lr", "auto"]),
        (TORCHRUN, "lora", ["--compile"]),
        (TORCHRUN, "lora", ["--freeze-below", "2", "--cache-frozen"]),
        # steps of 12 over the epoch's 37 examples: 12, 12, 12, then 1: that step's first
        # micro-batch is one example (a ghost on the second process), its other two are
        # empty on both processes (skipped by each)
        (TORCHRUN, "lora", ["--grad-accum", "3"]),
    ],
    ids=[
        "torchrun-lora",
        "torchrun-sparse",
        "torchrun-sparse-regrow",
        "torchrun-full",
        "accelerate-lora",
        "fsdp-full",
        "fsdp-lora",
        "torchrun-lora-lr-auto",
        "torchrun-lora-compile",
        "torchrun-lora-cache-frozen",
        "torchrun-lora-grad-accum",
    ],
)
def test_two_processes_train_what_one_does(
    tiny_dir, intent_file, tmp_path, monkeypatch, launcher, method, extra
):
    """DDP (through accelerate) and FSDP2: the weights, the logged loss and the eval
    metrics (each process evaluates a share) are those of one process; a sparse regrow
    grows the entries one process would (from the gradient of the whole batch); --lr auto
    chooses the rate one process does (every process the same); --compile's layers under
    DDP train what they do in one process (traced by aot_eager: inductor's C++ compile
    takes minutes on two cores); --cache-frozen's per-process caches (a ghost batch and a
    second epoch served in part) train what one process' cache does."""
    if "--compile" in extra:
        monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
        monkeypatch.setenv("SLIMTUNE_COMPILE_BACKEND", "aot_eager")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_train_args(tiny_dir, intent_file, one, tmp_path / "s1", method, 4) + extra) == 0
    port = 29500 + (os.getpid() + zlib.crc32(f"{launcher[2]} {method} {extra}".encode())) % 1000
    args = _train_args(tiny_dir, intent_file, two, tmp_path / "s2", method, 2) + extra
    proc = _launch(launcher, args, port, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # the main process alone reports and stores: one table, one version, one delta
    assert proc.stdout.count(f"slimtune train: {method} on") == 1
    assert proc.stdout.count("stored as") == 1
    assert len(DeltaStore(tmp_path / "s2").list()) == 1
    assert [p.name for p in two.glob("*delta*")] == ["delta"]
    assert not list(two.glob(".*.tmp"))
    a, b = _weights(one / "delta"), _weights(two / "delta")
    assert a.keys() == b.keys()
    # --lr auto: the very rate one process chose; it trains at a higher rate than the
    # default, which magnifies the two runs' float differences (the gradient summed in
    # halves across processes): 1.7e-5 on one CPU type, under 1e-5 on another
    tolerance = 1e-5
    if "auto" in extra:
        lr = [json.loads((run / "summary.json").read_text())["lr"] for run in (one, two)]
        assert lr[0] == lr[1]
        tolerance = 1e-4
    for k in a:
        if a[k].is_floating_point():
            rel = _relative_difference(a[k], b[k])
            assert rel <= tolerance, (k, rel)
        else:  # sparse indices: the same entries chosen
            assert torch.equal(a[k], b[k]), k
    # the logged loss is the global one: the one-process run's, step by step
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["final_train_loss"] == pytest.approx(s1["final_train_loss"], rel=1e-5)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-5)
    assert s2["eval_accuracy"] == s1["eval_accuracy"]
    assert s2["eval_examples"] == s1["eval_examples"]
    assert s2["lr"] == s1["lr"]
    if "--cache-frozen" in extra:  # one process serves step 11, the first of epoch 2
        assert (s1["frozen_cache"]["served"], s1["frozen_cache"]["computed"]) == (1, 10)
        assert s2["frozen_cache"]["served"] + s2["frozen_cache"]["computed"] == 11


def test_a_refusal_on_the_main_process_ends_every_process(tiny_dir, intent_file, tmp_path):
    """The main process prepares the output folder; its refusal (a finished run there) is
    every process' error, not a hang of the others at the next barrier."""
    out = tmp_path / "run"
    (out / "delta").mkdir(parents=True)
    (out / "delta" / "manifest.json").write_text("{}")
    args = _train_args(tiny_dir, intent_file, out, tmp_path / "s", "lora", 2)
    proc = _launch(TORCHRUN, args, 29500 + os.getpid() % 1000 + 7, tmp_path)
    assert proc.returncode != 0
    assert "already holds a finished run" in proc.stderr
    assert not DeltaStore(tmp_path / "s").list()


def test_two_processes_resume_the_main_process_checkpoint(tiny_dir, intent_file, tmp_path):
    """The main process writes the checkpoint once; every process resumes from it and the
    run ends with the weights of the run that was never stopped."""
    out = tmp_path / "run"
    args = _train_args(tiny_dir, intent_file, out, tmp_path / "s", "lora", 2)
    args[args.index("--max-steps") + 1] = "4"
    args[args.index("--save-every") + 1] = "2"  # one checkpoint, at step 2
    args += ["--keep-checkpoint", "--no-store"]
    port = 29500 + os.getpid() % 1000 + 11
    proc = _launch(TORCHRUN, args, port, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    whole = _weights(out / "delta")
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    shutil.rmtree(out / "delta")  # as if killed after the checkpoint
    proc = _launch(TORCHRUN, [*args, "--resume"], port + 1, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("resumed from") == 1
    resumed = _weights(out / "delta")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2, 3, 4]


def test_an_fsdp_checkpoint_resumes_in_one_process(tiny_dir, intent_file, tmp_path):
    """A sharded run's checkpoint holds whole tensors: one process (the same global batch,
    no --fsdp) resumes it and ends with the weights of the sharded run that never stopped."""
    out = tmp_path / "run"
    args = _train_args(tiny_dir, intent_file, out, tmp_path / "s", "full", 2)
    args[args.index("--max-steps") + 1] = "4"
    args[args.index("--save-every") + 1] = "2"  # one checkpoint, at step 2
    args += ["--keep-checkpoint", "--no-store"]
    proc = _launch(TORCHRUN, [*args, "--fsdp"], 29500 + os.getpid() % 1000 + 13, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    whole = _weights(out / "delta")
    shutil.rmtree(out / "delta")  # as if killed after the checkpoint
    args[args.index("--batch-size") + 1] = "4"
    assert main([*args, "--resume"]) == 0
    resumed = _weights(out / "delta")
    assert whole.keys() == resumed.keys()
    for k in whole:
        rel = _relative_difference(whole[k], resumed[k])
        assert rel <= 1e-5, (k, rel)
    # a different global batch is another run: refused by name
    args[args.index("--batch-size") + 1] = "2"
    shutil.rmtree(out / "delta")
    assert main([*args, "--resume"]) == 2


def test_experts_train_with_two_processes(tiny_dir, intent_file, tmp_path):
    """Experts leave some tensors without a gradient on a process (an expert none of its
    tokens chose): DDP looks for them, and the weights are one process'. (The router's
    balancing loss is computed on each process' share of the batch, so with it on the
    weights are close to one process', not equal: it is off here.) The expert usage the
    delta records counts the tokens of every process."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--aux-weight", "0"]
    assert main(_train_args(tiny_dir, intent_file, one, tmp_path / "s1", "experts", 4) + extra) == 0
    args = _train_args(tiny_dir, intent_file, two, tmp_path / "s2", "experts", 2) + extra
    proc = _launch(TORCHRUN, args, 29500 + os.getpid() % 1000 + 17, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(DeltaStore(tmp_path / "s2").list()) == 1
    a, b = _weights(one / "delta"), _weights(two / "delta")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(".usage"):  # token counts, summed over the processes
            assert torch.equal(a[k], b[k]), k
        else:
            rel = _relative_difference(a[k], b[k])
            assert rel <= 1e-5, (k, rel)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"method": "sparse", "fsdp": True}, "cannot be sharded (--fsdp)"),
        ({"method": "experts", "fsdp": True}, "routed per token"),
        ({"method": "lora", "fsdp": True, "quantize": "nf4"}, "--fsdp with --quantize"),
        ({"method": "lora", "fsdp": True, "compile": True}, "--compile with --fsdp"),
    ],
)
def test_fsdp_refusals_name_the_reason(options, message):
    from slimtune.errors import UserInputError
    from slimtune.training.config import TrainConfig

    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(data="x.jsonl", **options).validated()


def test_plan_refuses_a_bad_device_count(tiny_dir, intent_file, capsys):
    args = ["plan", "--model", str(tiny_dir), "--data", str(intent_file), "--device", "cpu"]
    assert main([*args, "--devices", "0"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
    assert main([*args, "--fsdp", "--quantize", "nf4"]) == 2
    assert "--fsdp with --quantize" in capsys.readouterr().err


# torchrun runs this in each process: slimtune train, with process 1 failing in its third step
_FAILING_RANK = """
import os, sys
import slimtune.training.trainer as trainer
from slimtune.cli.app import main

real, calls = trainer.accumulate_gradients, []

def accumulate_gradients(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        raise RuntimeError("injected failure of process 1")
    return real(*args, **kwargs)

trainer.accumulate_gradients = accumulate_gradients
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_that_fails_mid_run_leaves_the_checkpoint_and_no_version(
    tiny_dir, intent_file, tmp_path
):
    """Process 1 fails in step 3, after the checkpoint of step 2: the launcher ends the run
    with process 1's error, the store holds no version, and the checkpoint resumes to the
    end with one version stored."""
    out, store = tmp_path / "run", tmp_path / "s"
    args = _train_args(tiny_dir, intent_file, out, store, "lora", 2)
    args[args.index("--max-steps") + 1] = "4"
    args[args.index("--save-every") + 1] = "2"  # one checkpoint, at step 2
    driver = tmp_path / "failing_rank.py"
    driver.write_text(_FAILING_RANK)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(tmp_path)
    port = 29500 + os.getpid() % 1000 + 17
    proc = subprocess.run(
        [*TORCHRUN, "--master_port", str(port), str(driver), *args],
        capture_output=True, text=True, env=env, timeout=HANG,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "injected failure of process 1" in proc.stderr
    assert not DeltaStore(store).list()
    assert not (out / "delta").exists()
    checkpoint = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert checkpoint["step"] == 2
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2]
    # nothing half-written: no temporary or swapped-out folder beside the output
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]
    proc = _launch(TORCHRUN, [*args, "--resume"], port + 1, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("resumed from") == 1
    assert len(DeltaStore(store).list()) == 1
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [1, 2, 3, 4]
