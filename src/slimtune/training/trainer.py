"""The training loop: AdamW, warmup + cosine, gradient accumulation, checkpoints, resume.

What slimtune adds over a plain loop, and why:

* Only the trainable tensors, the optimizer, the schedule and the RNG states go into a
  checkpoint (the base is reloaded and checked by fingerprint), so a LoRA checkpoint of a
  135M model is a few MB, not the model.
* Batch order is a pure function of (seed, epoch), so a resumed run consumes exactly the
  batches the killed one would have: same seed, same final weights, bit for bit (with
  the frozen layers' cache, up to float rounding: a resumed run fills it again in other
  batches).
* A NaN/inf loss or gradient stops the run with the step, learning rate and data lines,
  and the last good checkpoint is left in place.
* Loss is averaged over the target tokens of the whole accumulated step, so gradient
  accumulation changes memory, not the result.
* Under torchrun / accelerate launch, N processes of batch B train on the examples one
  process of batch N x B does (DDP through accelerate, or FSDP2 with ``--fsdp``: see
  ``parallel.py``; loss averaged over all processes' tokens). Each evaluates a share of
  the eval set; the main process alone writes the folder, the checkpoints, the delta and
  the store entry, so the run's files are those of one process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..data import (
    IGNORE_INDEX,
    Dataset,
    collate,
    epoch_batches,
    load_dataset,
    pack_examples,
    shard_dataset,
    split_dataset,
)
from ..delta import MANIFEST, delta_bytes, save_delta
from ..errors import DataError, TrainingDivergedError, UserInputError
from ..eval.cost import PeakMemory, percentile
from ..fileio import (
    LockHeld,
    append_line,
    atomic_dir,
    file_lock,
    recover_dir,
    write_json,
    write_safetensors,
    write_text,
)
from ..log import info
from ..methods import Method, get_method, method_class
from ..model.anatomy import base_model, count_parameters, decoder_layers
from ..model.compile import compiled_layers
from ..model.kernels import apply_fused_kernels, choose_attention
from ..model.loading import LoadedModel, fingerprint, load_model, resolve_device
from ..model.quantize import quantization_of
from ..salf.freezing import freeze_below
from ..salf.frozen_cache import (
    AUTO_HOST_SHARE,
    HOST_SHARE,
    FrozenOutputCache,
    expected_bytes,
    store_for,
)
from . import trackers
from .config import TrainConfig
from .lr_scale import scaled_default_lr, weight_scale
from .lr_search import PROBE_BATCHES, LRSearch, search_lr
from .parallel import Parallel
from .step import (
    NonFiniteError,
    accumulate_gradients,
    adamw,
    lr_factor,
    steady_gc,
    warmup_steps,
)
from .summary import RunSummary


@dataclass
class TrainResult:
    """What a run produced. ``summary`` is the summary.json object (a dict, as documented);
    ``run_summary`` is the same numbers typed (:class:`RunSummary`)."""

    output_dir: Path
    delta_dir: Path
    manifest: dict
    summary: dict
    history: list[dict]
    model: nn.Module
    loaded: LoadedModel
    method: Method
    eval_dataset: Dataset | None
    eval_details: dict | None = None
    run_summary: RunSummary = field(kw_only=True)
    # False on the other processes of a multi-process run: only the main one evaluated and
    # wrote the delta (``manifest`` is empty there), so only it reports and stores
    main_process: bool = field(default=True, kw_only=True)


# marks accelerate's process-wide state as made by slimtune's own Accelerator
_MADE_HERE = "_slimtune_made_this_state"


def _forget_earlier_accelerator(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one process-wide state and refuses an Accelerator with another
    precision or device than the first: a second ``train()`` in the same Python process
    (fp32 after bf16, CPU after GPU) failed. Only a state slimtune made itself, in a single
    process, is dropped and made anew; a caller's own Accelerator or a process group is
    never torn down under it (a clear error instead)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    state = AcceleratorState()
    device = "cpu" if cpu else "cuda"
    if state.mixed_precision == mixed_precision and (state.device.type == "cpu") == cpu:
        return
    several = state.num_processes > 1 or (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    )
    if several or not shared.get(_MADE_HERE):
        raise UserInputError(
            f"this Python process already set up accelerate for precision "
            f"{state.mixed_precision!r} on {state.device.type}, and accelerate allows one "
            f"setting per process; this run needs {mixed_precision!r} on {device}. Pass "
            "--precision/--device to match it, or train in a new process"
        )
    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    device = resolve_device(cfg.device)  # an explicit device must exist: no silent CPU run
    cpu = device == "cpu"
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError(
            f"--device {device} with several processes: each takes its own GPU (its "
            "LOCAL_RANK); use --device cuda (or auto) and CUDA_VISIBLE_DEVICES to choose them"
        )
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # the Accelerator trains on the current GPU
    if cfg.precision == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    else:
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    _forget_earlier_accelerator(mp, cpu)
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=method_class(cfg.method).unused_parameters,
        broadcast_buffers=False,  # the same on every process; a sparse delta's are large
        gradient_as_bucket_view=True,  # no second copy of the gradients
    )
    from accelerate.state import AcceleratorState

    made_before = bool(AcceleratorState._shared_state)
    try:
        return Accelerator(
            cpu=cpu,
            mixed_precision=mp,
            kwargs_handlers=[ddp],
            **trackers.accelerator_options(
                trackers.parse_report_to(cfg.report_to), Path(cfg.output_dir)
            ),
        )
    finally:  # also when it failed after making the state: that state is slimtune's too
        if not made_before and AcceleratorState._shared_state:
            AcceleratorState._shared_state[_MADE_HERE] = True


def _rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain numbers, so a checkpoint loads with
    ``torch.load(weights_only=True)`` (no pickled objects that could run code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LOCK_FILE = ".lock"
# Options --resume may lower (the advice after a divergence), all others must match.
LOWERABLE = ("lr", "max_grad_norm")
# identity keys added since checkpoints were first written, with what an older one meant
IDENTITY_BEFORE = {"quantize": "none"}


def _local_processes() -> int:
    """This host's processes of the run (torchrun / accelerate set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def finished_delta(output_dir: str | Path) -> Path | None:
    """The delta of a finished run in ``output_dir`` (written last, atomically), or None."""
    delta = Path(output_dir) / "delta"
    return delta if (delta / MANIFEST).is_file() else None


class Trainer:
    def __init__(self, cfg: TrainConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg.validated()
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoint"
        self.metrics_path = self.out / "metrics.jsonl"
        self.accelerator = _accelerator(cfg)
        self.device = self.accelerator.device
        self._lock = contextlib.ExitStack()  # the output folder's lock, held until close()
        try:
            # a refusal here must release the lock it just took; only the main process
            # prepares (and locks) the folder, the others wait and share its verdict
            self._on_main(self._prepare_output)
            self._setup(loaded)
            if self.cfg.overwrite:  # only now: a run that fails to start keeps the one it replaces
                self._on_main(self._clear_replaced_run)
        except BaseException:
            self.close()
            raise

    def _on_main(self, fn) -> None:
        """Run ``fn`` on the main process only while the others wait; a failure there is
        raised on every process (a refusal as the same ``UserInputError``), so none is
        left waiting in a collective for a process that has stopped."""
        acc = self.accelerator
        if acc.num_processes == 1:
            fn()
            return
        from accelerate.utils import broadcast_object_list

        error: list[Any] = [None]
        failure: BaseException | None = None
        if acc.is_main_process:
            try:
                fn()
            except Exception as e:
                failure = e
                error = [(isinstance(e, UserInputError), f"{type(e).__name__}: {e}", str(e))]
        broadcast_object_list(error)  # also the barrier: the others wait for fn here
        if failure is not None:
            raise failure
        if error[0] is not None:
            refusal, described, message = error[0]
            if refusal:
                raise UserInputError(message)
            raise RuntimeError(f"the main process failed: {described}")

    def close(self) -> None:
        """Release the output folder and the frozen layers' cache (``run`` does this when
        it ends)."""
        trackers.finish(self.accelerator)
        cache = getattr(self, "frozen_cache", None)
        if cache is not None:
            cache.close()
        self._lock.close()

    def _setup(self, loaded: LoadedModel | None) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        t0 = time.perf_counter()
        # as load_model does, for a model loaded elsewhere; before any forward (the analysis)
        attention_chosen = choose_attention(self.device)
        # --precision fp32 means fp32 weights too (a GPU otherwise loads the base in bf16)
        dtype = "fp32" if cfg.precision == "fp32" else None
        self.loaded = loaded or load_model(
            cfg.model, device=str(self.device), dtype=dtype, quantize=cfg.quantize
        )
        held = quantization_of(self.loaded.model)
        if held != cfg.quantize:  # the manifest and checkpoints record cfg.quantize
            raise UserInputError(
                f"the preloaded model's base is stored as {held!r} but the run asks for "
                f"--quantize {cfg.quantize}; load it with load_model(..., "
                f"quantize={cfg.quantize!r}) or set quantize={held!r}"
            )
        self.loaded.model.to(self.device)
        self.base_fingerprint = fingerprint(self.loaded.model)
        info(
            f"model {self.loaded.name}: {self.loaded.num_layers} layers, "
            f"loaded in {time.perf_counter() - t0:.1f}s"
        )

        tok = self.loaded.tokenizer
        self.train_ds = load_dataset(cfg.data, tok, max_length=cfg.max_length)
        if cfg.eval_data:
            self.eval_ds: Dataset | None = load_dataset(
                cfg.eval_data, tok, max_length=cfg.max_length
            )
        else:
            self.train_ds, self.eval_ds = split_dataset(self.train_ds, cfg.eval_fraction, cfg.seed)
            if not self.eval_ds.examples:
                self.eval_ds = None
        self._check_eval_fits()
        self.examples = (
            pack_examples(self.train_ds.examples, cfg.max_length)
            if cfg.pack
            else self.train_ds.examples
        )
        if not self.examples:
            raise UserInputError(f"{cfg.data}: no training examples left after the eval split")
        # each example's target tokens as the loss counts them (labels shifted by one):
        # a step's total is known to every process without asking the others
        self._targets = [sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in self.examples]

        n_layers = self.loaded.num_layers
        self.auto_freeze: dict | None = None
        self.freeze_k = self._auto_freeze() if cfg.freeze == "auto" else cfg.freeze_below
        if self.freeze_k >= n_layers:  # every layer frozen: full would train the norm alone
            raise UserInputError(
                f"--freeze-below {self.freeze_k}: the model has {n_layers} layers "
                f"(0-{n_layers - 1}), so none would be left to train"
            )
        self.layers = list(range(self.freeze_k, n_layers))
        if self.freeze_k and cfg.lr is None and not cfg.lr_auto and not cfg.resume:
            info(  # a resumed run keeps its rate: the advice is for the next run
                f"note: training {len(self.layers)} of {n_layers} layers at the default rate; "
                "a frozen run may train better at another rate: --lr auto measures one on "
                "this data (BENCHMARKS.md, SALF at --lr auto)"
            )
        # Liger's RMSNorm/SwiGLU/RoPE kernels on CUDA where installed, before a method wraps
        # the model (the loss takes Liger's fused linear cross-entropy on its own); with
        # --compile inductor fuses those itself
        self.fused_kernels = apply_fused_kernels(
            self.loaded.model, self.device, elementwise=not cfg.compile
        )
        if attention_chosen:
            self.fused_kernels.append("sdpa without cudnn")
        if cfg.compile:
            self.fused_kernels.append("torch.compile")
        self.method = get_method(cfg.method, cfg.method_options)
        self.method.run_steps = cfg.max_steps
        self.method.progress = cfg.progress
        # the size of the base's weights, read before the method wraps them: a method's
        # default rate follows it (lr_scale.py); a resumed run keeps its checkpoint's rate
        # (read even then: --resume with no checkpoint yet starts from step 0)
        self.weight_scale = (
            weight_scale(self.loaded.model)
            if self.method.lr_weight_exponent and not isinstance(cfg.lr, float)
            else 1.0
        )
        self.model = self.method.prepare(
            self.loaded.model, self.layers, batches=self._calibration_batches
        )
        if cfg.gradient_checkpointing:
            base_model(self.model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        freeze_below(self.model, self.freeze_k)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise UserInputError("nothing to train: every parameter is frozen")
        self.frozen_cache = self._frozen_cache()
        self.trainable, self.total = count_parameters(self.model)
        if cfg.fsdp and self.accelerator.num_processes == 1:
            info("--fsdp with one process: nothing to shard, the model stays whole")
        self.parallel = Parallel.build(
            self.model,
            decoder_layers(self.model),
            self.accelerator,
            fsdp=cfg.fsdp,
            aux_loss=lambda: self.method.auxiliary_loss(self.model),
            frozen_cache=self.frozen_cache,
        )
        # after sharding: under FSDP2 the parameters are this process' shards
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        # the peak learning rate: --lr, the method's default, or (--lr auto) the range
        # test's choice, made below unless a checkpoint holds it
        self.lr = cfg.lr if isinstance(cfg.lr, float) else self.default_lr
        if (
            cfg.lr is None
            and not cfg.lr_auto
            and not cfg.resume
            and self.lr != self.method.default_lr
        ):
            e = self.method.lr_weight_exponent
            info(
                f"lr {self.lr:g}: {cfg.method}'s default {self.method.default_lr:g} x "
                f"{self.weight_scale:.2f}" + (f"^{e:g}" if e != 1 else "") + ", rounded "
                f"({self.weight_scale:.2f}: this model's weight size against the model the "
                "defaults were swept on; training/lr_scale.py; --lr sets one)"
            )
        self.lr_search: LRSearch | None = None
        self._build_optimizer()
        self.step = 0
        self.history: list[dict] = []
        if cfg.resume:
            self._load_checkpoint()
        if cfg.lr_auto and self.step == 0:
            self._search_lr()
            if self.frozen_cache is not None:  # its states stay; its counts are the run's
                self.frozen_cache.served = self.frozen_cache.computed = 0

    def _check_eval_fits(self) -> None:
        """Before training, not after it: the evaluation can read the eval data for the
        task (``--task``, or the one the training data implies)."""
        from ..eval.tasks import check_task

        check_task(self.cfg.task, self.train_ds)
        train, held = self.train_ds, self.eval_ds
        if held is not None and held.shape != train.shape:
            raise DataError(
                held.path,
                f"holds {held.shape} records, the training data ({train.path}) "
                f"{train.shape} records: the evaluation reads them as the training data's",
            )

    def _frozen_cache(self) -> FrozenOutputCache | None:
        """The cache of the frozen layers' output (``--cache-frozen``), or None.

        ``auto`` (the default) keeps it where it pays and costs little: layers are frozen,
        the run sees its data twice or more (the first sight of an example fills it), one
        process runs (each process would keep its own, and a batch is served only once its
        process has seen all of its examples), and the states fit (``store_for``)."""
        asked = self.cfg.cache_frozen
        if asked is False or not self.freeze_k:
            if asked is True:
                info("--cache-frozen: no layer is frozen, nothing to cache")
            return None
        processes = self.accelerator.num_processes
        passes = self._passes()
        why_not = self._why_not_cached_by_default()
        if asked == "auto" and why_not:
            if why_not != "processes":  # the only case worth a note: it would pay
                return None
            info(
                f"note: this run sees its data {passes:.1f} times; with {processes} processes "
                "the frozen layers' output is not cached unless asked (--cache-frozen): "
                "each process would keep its own, and a batch skips the frozen layers only "
                "once its own process has seen all of its examples"
            )
            return None
        need = expected_bytes(self.model, [len(e.input_ids) for e in self.examples])
        share = HOST_SHARE if asked is True else AUTO_HOST_SHARE
        try:
            store = store_for(need, self.device, processes=_local_processes(), host_share=share)
        except UserInputError:
            if asked is True:
                raise
            info(
                f"note: the frozen layers' output (about {need / 2**30:.2f} GiB) is not "
                f"cached: by default it takes at most {AUTO_HOST_SHARE:.0%} of this host's "
                f"available memory (--cache-frozen allows up to {HOST_SHARE:.0%})"
            )
            return None
        where = "host memory" if store.type == "cpu" else str(store)
        said = (
            f"--cache-frozen: layers 0-{self.freeze_k - 1} run once per example, their "
            f"output kept in {where} (about {need / 2**20:.0f} MiB)"
        )
        if asked == "auto":  # measured: 0.83x the frozen step after the first epoch
            said += (
                f"; on because the run sees its data {passes:.1f} times "
                "(--no-cache-frozen turns it off)"
            )
        info(said)
        if processes > 1:
            info(
                "--cache-frozen with several processes: each keeps what it computed, and a "
                "batch skips the frozen layers once its process has seen all of its "
                "examples, which takes more epochs the more processes there are"
            )
        return FrozenOutputCache(self.model, self.freeze_k, store)

    def _passes(self) -> float:
        """How many times the run sees its training data. A resumed run counts the whole
        run too: the cache runs the frozen layers in eval mode, so a resumed run must make
        the uninterrupted run's choice to end with its weights (dropout below the cut)."""
        cfg = self.cfg
        seen = cfg.max_steps * cfg.grad_accum * cfg.batch_size * self.accelerator.num_processes
        return seen / len(self.examples)

    def _why_not_cached_by_default(self) -> str | None:
        """Why ``cache_frozen: auto`` would not keep a frozen run's states ("passes",
        "fsdp", "processes"), memory aside; None where it would."""
        if self._passes() < 2:
            return "passes"
        if self.cfg.fsdp:
            return "fsdp"
        return "processes" if self.accelerator.num_processes > 1 else None

    @property
    def default_lr(self) -> float:
        """The method's default rate for this model: the centre of ``--lr auto``'s range
        test, and the rate when none is given."""
        return scaled_default_lr(type(self.method), self.weight_scale)

    def _build_optimizer(self) -> None:
        self.optimizer = adamw(
            self.method.param_groups(self.params, self.cfg.weight_decay), self.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(lr_factor, warmup=warmup_steps(self.cfg), total=self.cfg.max_steps),
        )

    def _search_lr(self) -> None:
        """``--lr auto``: the range test on this run's first batches (lr_search.py); the
        model, optimizer and RNG are as before it, so the run is the one ``--lr <chosen>``
        runs."""
        cfg = self.cfg

        def step_data(i: int) -> tuple[list[dict[str, torch.Tensor]], int]:
            batches, _, targets = self._step_batches(i)
            return batches, targets

        # the probe: the same few training examples on every process (a fixed draw)
        g = torch.Generator().manual_seed(cfg.seed)
        size = PROBE_BATCHES * cfg.batch_size
        drawn = torch.randperm(len(self.examples), generator=g)[:size].tolist()
        examples = [self.examples[i] for i in sorted(drawn)]
        pad = self.loaded.tokenizer.pad_token_id
        probe = [
            {
                k: v.to(self.device)
                for k, v in collate(examples[s : s + cfg.batch_size], pad).items()
            }
            for s in range(0, len(examples), cfg.batch_size)
        ]
        groups = self.method.param_groups(self.params, cfg.weight_decay)
        with self._compute_context():
            search = search_lr(
                parallel=self.parallel,
                params=self.params,
                make_optimizer=lambda lr: adamw(groups, lr),
                step_data=step_data,
                probe=probe,
                state=self.method.trainable_state(self.model),
                device=self.device,
                autocast=self.accelerator.autocast,
                max_grad_norm=cfg.max_grad_norm,
                default_lr=self.default_lr,
                progress=cfg.progress and self.accelerator.is_main_process,
                after_step=lambda: self.method.step_metrics(self.model),  # not logged
            )
        self.lr_search, self.lr = search, search.chosen
        self._build_optimizer()
        info(
            f"--lr auto: {search.chosen:.3g} ({search.reason}; {search.steps} steps, "
            f"{search.seconds:.1f}s)"
        )

    def _auto_freeze(self) -> int:
        """SALF: the analysis' freeze_below, or with a budget the shallowest that fits it."""
        from ..options import parse_duration, parse_size
        from ..salf.analysis import analyze
        from ..salf.plan import (
            budget_freeze_below,
            calibrate,
            calibration_batch,
            describe,
            estimate,
            freeze_costs,
            typical_batch,
        )

        cfg = self.cfg
        a = analyze(self.loaded.model, self.train_ds, keep=cfg.keep, progress=cfg.progress)
        # what each cut costs, as `slimtune analyze` shows it (kept in the manifest, for
        # the dashboard): informative only, so a failure is a warning, and its mini models
        # draw from a forked RNG (they seed their own; the run's --seed stays in force)
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                a.costs = freeze_costs(
                    self.loaded.model,
                    cfg.method,
                    self.examples,
                    cfg.batch_size,
                    self.loaded.tokenizer.pad_token_id,
                    cfg.method_options,
                )
        except Exception as e:  # e.g. out of memory next to the full model
            info(f"warning: the cost of each cut was not measured ({type(e).__name__}: {e})")
        info(f"{'warning: ' if a.fit['degenerate'] else ''}--freeze auto: {a.reason}")
        k, est = a.freeze_below, None
        memory, step = parse_size(cfg.budget_memory), parse_duration(cfg.budget_step_time)
        if memory or step:
            pad = self.loaded.tokenizer.pad_token_id
            batch = calibration_batch(self.examples, cfg.batch_size, pad)
            # the step budget bounds the typical step (wall time), memory the longest batch
            typical = typical_batch(self.examples, cfg.batch_size, pad)
            costs = calibrate(
                self.loaded.model,
                cfg.method,
                cfg.method_options,
                batch,
                autocast=self.accelerator.autocast,
                quantize=cfg.quantize,  # the mini models quantized as the run's base
                typical_batch=None
                if typical["input_ids"].shape == batch["input_ids"].shape
                else typical,
            )
            costs.scale_times(cfg.grad_accum)
            kb = budget_freeze_below(costs, memory=memory, step_time=step)
            top = estimate(costs, costs.num_layers - 1)
            if kb is None:
                raise UserInputError(
                    f"the budget is too small: training only the top layer needs {describe(top)}"
                )
            k, est = kb, estimate(costs, kb)
            cached = cfg.cache_frozen is True or (
                cfg.cache_frozen == "auto" and self._why_not_cached_by_default() is None
            )
            info(  # the step budget holds the uncached step: the first epoch's
                f"budget policy: unfreezing from the top, layers {k}-{costs.num_layers - 1} "
                f"fit: {describe(est, cached=cached)}"
            )
        self.auto_freeze = {
            "analysis_freeze_below": a.freeze_below,
            "reason": a.reason,
            "freeze_below": k,
            "expected_gain": a.gain[k],
            "fit": a.fit,
            "estimate": est.to_dict() if est else None,
            "analysis": a.to_dict(),  # per-layer curves, gain and costs: the dashboard's
        }
        return k

    def _calibration_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n`` batches of the training data in file order, on the device.

        Batches of the global batch size (``batch_size x processes``), the same on every
        process: each scores and selects what a one-process run of that batch would, so the
        trained weights are the same on all (and the same as that run's)."""
        pad = self.loaded.tokenizer.pad_token_id
        bs = self.cfg.batch_size * self.accelerator.num_processes
        out = []
        for s in range(0, min(n * bs, len(self.examples)), bs):
            b = collate(self.examples[s : s + bs], pad)
            out.append({k: v.to(self.device) for k, v in b.items()})
        return out

    # -- output folder and checkpoints ---------------------------------------------------

    def _prepare_output(self) -> None:
        """Lock the output folder for the whole run, clear what a killed run leaked, and
        refuse to replace a run (or to resume one that is not there) unasked."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.enter_context(file_lock(self.out / LOCK_FILE, wait=False))
        except LockHeld:
            raise UserInputError(
                f"another slimtune process is training into {self.out}; "
                "wait for it to end or choose another --output-dir"
            ) from None
        for leaked in [*self.out.glob(".checkpoint.*.tmp"), *self.out.glob(".delta.*.tmp")]:
            shutil.rmtree(leaked, ignore_errors=True)  # a kill inside atomic_dir; we own it now
        ckpt = recover_dir(self.ckpt_dir)
        finished = finished_delta(self.out)
        if cfg.overwrite:
            pass  # the run there goes once this one has loaded its model and data
        elif cfg.resume and finished is not None:
            raise UserInputError(
                f"{self.out} holds a finished run ({finished}): nothing to "
                "resume; --overwrite trains it again"
            )
        elif cfg.resume and ckpt is None and any(p.name != LOCK_FILE for p in self.out.iterdir()):
            raise UserInputError(
                f"{self.out} holds no checkpoint to resume (the run stopped "
                "before its first --save-every step); run again without "
                "--resume, or with --overwrite to clear the folder"
            )
        elif not cfg.resume and (ckpt is not None or (self.out / "delta").exists()):
            what = "a checkpoint" if ckpt is not None else "a finished run"
            raise UserInputError(
                f"{self.out} already holds {what}; pass --resume to continue "
                "it, --overwrite to replace it, or another --output-dir"
            )
        elif not cfg.resume:  # a run that died before its first checkpoint: its log goes
            self.metrics_path.unlink(missing_ok=True)

    def _clear_replaced_run(self) -> None:
        """--overwrite: remove the run this one replaces, once this one has loaded its model
        and data and is about to train (a typo in --data must not cost the old run)."""
        for p in (self.ckpt_dir, self.ckpt_dir.with_name("checkpoint.old"), self.out / "delta"):
            shutil.rmtree(p, ignore_errors=True)
        self.metrics_path.unlink(missing_ok=True)

    def _identity(self) -> dict[str, Any]:
        identity = self.cfg.identity()
        # the global batch, not the per-process one: a run resumes with another number of
        # processes as long as batch_size x processes is the same
        identity["global_batch_size"] = identity.pop("batch_size") * self.accelerator.num_processes
        return {
            **identity,
            "lr": self.lr,
            # the options as resolved (defaults filled in): a default that changed between
            # versions shows here, not as tensors of the wrong shape
            "method_config": self.method.config.to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "data_fingerprint": self.train_ds.fingerprint(),
        }

    def save_checkpoint(self) -> None:
        """Called on every process, written by the main one: under DDP every process holds
        the same trainable tensors and optimizer state; under FSDP2 they are gathered
        whole first, so any number of processes resumes the checkpoint."""
        self._gather_statistics()
        optimizer = self.parallel.optimizer_state(self.optimizer)  # of the shards: before
        with self.parallel.gathered():
            self._on_main(lambda: self._write_checkpoint(optimizer))

    def _gather_statistics(self) -> None:
        if self.parallel.world > 1:
            self.method.gather_statistics(
                self.model, self.parallel.sum, self.accelerator.is_main_process
            )

    def _write_checkpoint(self, optimizer: dict[str, Any]) -> None:
        with atomic_dir(self.ckpt_dir, replace=True) as tmp:
            write_safetensors(
                tmp / "trainable.safetensors", self.method.trainable_state(self.model)
            )
            # tensors and plain values only: --resume loads it with weights_only=True
            torch.save(
                {
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state(),
                },
                tmp / "state.pt",
            )
            write_json(
                tmp / "checkpoint.json",
                {
                    "step": self.step,
                    "identity": self._identity(),
                    "method_state": self.method.state_dict(self.model),
                    "lr_search": self.lr_search.to_dict() if self.lr_search else None,
                },
            )

    def _load_checkpoint(self) -> None:
        """Resume: checkpoint.json's identity is checked first, then only tensors and plain
        values are loaded (``weights_only``: a planted pickle cannot run code)."""
        ckpt = recover_dir(self.ckpt_dir)
        if ckpt is None:
            info(f"no checkpoint in {self.out}; starting from step 0")
            return

        def unreadable(why: object) -> UserInputError:
            return UserInputError(
                f"{ckpt}: unreadable checkpoint ({why}); use --overwrite to start over"
            )

        try:
            meta = json.loads((ckpt / "checkpoint.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise unreadable(e) from e
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("step"), int)
            and meta["step"] >= 0
            and isinstance(meta.get("identity"), dict)
        ):
            raise unreadable("checkpoint.json lacks a valid step and identity")
        had = {**IDENTITY_BEFORE, **meta["identity"]}
        if "global_batch_size" not in had:  # before it was recorded: one process' batch
            had["global_batch_size"] = had.get("batch_size")
        want = json.loads(json.dumps(self._identity()))
        found = meta.get("lr_search")
        searched = isinstance(found, dict)
        # --lr auto, or no --lr: the rate chosen (or given, or the default then) when the
        # run started, with no second range test; a default that moved since (another
        # slimtune, lr_scale.py) does not change a run under way
        keep = self.cfg.lr_auto or self.cfg.lr is None
        if keep and isinstance(had.get("lr"), (int, float)):
            want["lr"] = self.lr = float(had["lr"])
        if searched:
            self.lr_search = LRSearch.from_dict(found)
        if "method_config" not in had:  # a checkpoint of an older slimtune, before it recorded them
            want.pop("method_config")
        diff = sorted(k for k in want if had.get(k) != want[k])
        if "method_config" in diff:  # name the options, not the whole mapping
            diff.remove("method_config")
            old, new = had["method_config"], want["method_config"]
            diff += sorted(f"method option {k}" for k in new if old.get(k) != new[k])
        lowered = {
            k: (had[k], want[k])
            for k in LOWERABLE
            if k in diff
            and isinstance(had[k], (int, float))
            and isinstance(want[k], (int, float))
            and want[k] < had[k]
        }
        diff = [k for k in diff if k not in lowered]
        if diff:
            hint = (
                f" (its rate, {had['lr']:g}, was chosen by --lr auto: resume with --lr auto)"
                if "lr" in diff and searched
                else ""
            )
            raise UserInputError(
                f"{ckpt}: cannot resume, the run differs in {diff}{hint}; "
                "use the original options (a lower lr or max_grad_norm is "
                "allowed) or --overwrite"
            )
        if meta["step"] > self.cfg.max_steps:  # the same max_steps recorded: a damaged file
            raise unreadable(f"step {meta['step']} is past its max_steps {self.cfg.max_steps}")
        try:
            tensors = load_file(str(ckpt / "trainable.safetensors"))
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
            targets = {**dict(self.model.named_buffers()), **dict(self.model.named_parameters())}
            if set(tensors) - set(targets):
                raise ValueError(
                    f"tensors not in the model: {sorted(set(tensors) - set(targets))[:3]}"
                )
            for name, value in tensors.items():
                if value.shape != targets[name].shape:
                    raise UserInputError(
                        f"{ckpt}: cannot resume, {name} has shape {tuple(value.shape)} in the "
                        f"checkpoint, {tuple(targets[name].shape)} in this run: a method option "
                        "differs (a checkpoint of an older slimtune may need the old defaults, "
                        "e.g. -o structure=entries for sparse); use the original options or "
                        "--overwrite"
                    )
                self.parallel.copy_into(targets[name], value)
            self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            self.method.load_state_dict(self.model, meta.get("method_state") or {})
        except (UserInputError, torch.cuda.OutOfMemoryError, MemoryError):
            raise  # not a damaged checkpoint: it stays usable, so no advice to replace it
        except Exception as e:
            raise unreadable(e) from e
        self.step = meta["step"]
        if self.accelerator.num_processes > 1:  # the checkpoint holds the totals: the main
            # process keeps them, the others count from zero (see gather_statistics)
            self.method.gather_statistics(self.model, lambda t: t, self.accelerator.is_main_process)
        if "lr" in lowered:
            self._scale_lr(lowered["lr"][1] / lowered["lr"][0])
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the kill
                # a "resumed" record at this step is from an earlier resume of this same
                # checkpoint, which never saved: its changes are not in these weights
                stale = rec.get("event") == "resumed" and rec.get("step") == self.step
                if rec.get("step", 0) <= self.step and not stale:
                    kept.append(rec)
            self.history = kept
            if self.accelerator.is_main_process:  # the others read it too: same records
                write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        info(f"resumed from {ckpt} at step {self.step}")
        if lowered:
            changed = ", ".join(f"{k} {old:g} -> {new:g}" for k, (old, new) in lowered.items())
            info(f"warning: resuming with {changed} (recorded in metrics.jsonl and the manifest)")
            self._log(
                {
                    "step": self.step,
                    "event": "resumed",
                    "changed": {k: list(v) for k, v in lowered.items()},
                }
            )

    def _scale_lr(self, ratio: float) -> None:
        """Lower the whole schedule (peak, current and remaining steps) by ``ratio``."""
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        self.scheduler.base_lrs = [lr * ratio for lr in self.scheduler.base_lrs]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- the loop ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _compute_context(self) -> Iterator[None]:
        """How training steps compute: under autocast a method may compute in its dtype
        (e.g. peft adapters on bf16 input); with ``--compile`` the decoder layers run
        compiled (the range test's steps too, so the compile is paid once)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._method_context())
            if self.cfg.compile:
                stack.enter_context(compiled_layers(self.model))
            yield

    def _method_context(self) -> contextlib.AbstractContextManager:
        """The method's own compute under autocast (training and the final evaluation, so
        the delta is scored as it was trained: LoRA on the layer's bf16 input)."""
        if self.accelerator.mixed_precision == "no":
            return contextlib.nullcontext()
        return self.method.compute_context(self.model)

    def _step_batches(self, step: int) -> tuple[list[dict[str, torch.Tensor]], list[int], int]:
        """Optimizer step ``step``'s micro-batches on this process (empty ones left out),
        their data lines (for a divergence message) and the step's target tokens over all
        processes: the training loop's and the range test's steps alike."""
        ga = self.cfg.grad_accum
        indices = range(step * ga, (step + 1) * ga)
        micro = [self._micro_batch(index) for index in indices]
        batches = [self._collate(idx, index) for idx, index in zip(micro, indices)]
        lines = [self.examples[i].line for idx in micro for i in idx]
        targets = sum(self._targets[i] for index in indices for i in self._global_batch(index))
        return [b for b in batches if b is not None], lines, targets

    def _step_batch(self, step: int) -> list[int]:
        """Optimizer step ``step``'s examples, every micro-batch and process together: the
        batch one process of ``batch_size x grad_accum x processes`` would take (a pure
        function of seed and epoch). An epoch is cut into steps, not into micro-batches, so
        accumulation changes memory, not which examples a step sees (a step straddled two
        epochs when the epoch did not divide into micro-batches evenly)."""
        size = self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes
        per_epoch = math.ceil(len(self.examples) / size)
        epoch, pos = divmod(step, per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._epoch_batches = epoch_batches(len(self.examples), size, self.cfg.seed, epoch)
        return self._epoch_batches[pos]

    def _global_batch(self, index: int) -> list[int]:
        """Global micro-batch ``index`` (step x grad_accum + its place in the step): a
        contiguous part of its step's batch, ``batch_size x processes`` examples (fewer or
        none in an epoch's short last step)."""
        step, part = divmod(index, self.cfg.grad_accum)
        size = self.cfg.batch_size * self.accelerator.num_processes
        return self._step_batch(step)[part * size : (part + 1) * size]

    def _micro_batch(self, index: int) -> list[int]:
        """This process' share of global micro-batch ``index``: a contiguous part
        (``batch_size`` examples, fewer or none in an epoch's short last batch). So N
        processes of batch B train on exactly the examples one process of batch N x B
        does, in the same steps and epochs."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        batch = self._global_batch(index)
        share, extra = divmod(len(batch), world)
        start = rank * share + min(rank, extra)
        return batch[start : start + share + (rank < extra)]

    def _check_weights(self, lines: list[int]) -> None:
        """Before a checkpoint or the delta is written: a NaN/inf weight stops the run
        (checked then, not every step: each check waits for the device, on every
        process; a finite loss and gradient norm make one rare)."""
        bad = self.parallel.nonfinite_norm(self.params)
        if bad is not None:
            self.step -= 1  # reported as the step that produced it
            raise self._diverged("weights", bad, lines)

    def _collate(self, idx: list[int], index: int) -> dict[str, torch.Tensor] | None:
        """The batch of examples ``idx``, this process' share of global micro-batch
        ``index``. A process with none (its share of an epoch's short last batch) runs a
        ghost: the global batch's first example with no targets,
        as every process must run each forward and backward the others run. With one
        process an empty micro-batch is skipped (None)."""
        pad = self.loaded.tokenizer.pad_token_id
        # the batch's examples by index, for the frozen layers' cache
        named = {"example_ids": idx} if self.frozen_cache is not None else {}
        if idx:
            return {**collate([self.examples[i] for i in idx], pad), **named}
        glob = self._global_batch(index)
        if self.accelerator.num_processes == 1 or not glob:  # none runs it: all skip it
            return None
        first = glob[0]
        batch = collate([self.examples[first]], pad)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        if named:
            named["example_ids"] = [first]
        return {**batch, **named, "ghost": True}

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            append_line(self.metrics_path, json.dumps(record))
        if self.accelerator.trackers:
            self.accelerator.log(trackers.numeric(record), step=record["step"])

    def _diverged(self, what: str, value: float, lines: list[int]) -> TrainingDivergedError:
        last = recover_dir(self.ckpt_dir)
        advice = (
            f"the last good checkpoint is {last}: continue it with --resume and a lower "
            "--lr (or --max-grad-norm)"
            if last
            else "no checkpoint was written yet: run again with a lower --lr"
        )
        self._log({"step": self.step + 1, "event": "diverged", what: value})
        return TrainingDivergedError(
            f"{what} became {value} at step {self.step + 1} (lr {self.scheduler.get_last_lr()[0]:.3g}; "
            f"data lines {lines[:8]}); {advice}, or check those lines"
        )

    def run(self) -> TrainResult:
        """Train to ``max_steps``, evaluate, save the delta; then release the output folder."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        trackers.start(
            acc,
            trackers.parse_report_to(cfg.report_to),
            self.out,
            {f.name: getattr(cfg, f.name) for f in fields(cfg)},
        )
        self.model.train()
        step_times: list[float] = []
        tokens = 0
        train_time = 0.0
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.max_steps,
                initial=self.step,
                desc=f"train {cfg.method}",
                unit="step",
                dynamic_ncols=True,
            )
        compute = self._compute_context()
        lines: list[int] = []  # the last step's data lines, for a divergence message
        with PeakMemory(self.device) as mem, compute, steady_gc():
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                batches, lines, targets = self._step_batches(self.step)
                try:
                    loss_sum, grad_norm, n_tokens, n_target = accumulate_gradients(
                        self.parallel,
                        self.params,
                        batches,
                        self.device,
                        acc.autocast,
                        cfg.max_grad_norm,
                        targets=targets,
                    )
                except NonFiniteError as e:
                    raise self._diverged(e.what, e.value, lines) from None
                tokens += n_tokens
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.method.on_step_end(self.model, self.optimizer, self.step)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                train_time += dt
                step_times.append(dt)
                self.step += 1
                loss_mean = loss_sum / max(n_target, 1)
                rec = {
                    "step": self.step,
                    "loss": loss_mean,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "step_time_s": dt,
                    "tokens_per_s": tokens / train_time if train_time else 0.0,
                    **self.method.step_metrics(self.model),
                }
                evaluate_now = cfg.eval_every and self.step % cfg.eval_every == 0
                if evaluate_now and self.eval_ds:
                    rec["eval_loss"] = self._eval_loss()
                self._log(rec)
                if bar:
                    post = {"loss": f"{loss_mean:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    if "eval_loss" in rec:
                        post["eval"] = f"{rec['eval_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self._check_weights(lines)
                    self.save_checkpoint()
        if bar:
            bar.close()
        if self.frozen_cache is not None:
            c = self.frozen_cache.summary()
            info(
                f"--cache-frozen: {c['served']} of {c['served'] + c['computed']} micro-batches "
                f"skipped the frozen layers ({c['examples']} examples kept, "
                f"{c['bytes'] / 2**20:.0f} MiB)"
            )
        self._check_weights(lines)
        return self._finish(mem, train_time, tokens, step_times)

    def _eval_share(self) -> Dataset:
        """This process' share of the eval set (all of it with one process)."""
        assert self.eval_ds is not None
        acc = self.accelerator
        return shard_dataset(self.eval_ds, acc.process_index, acc.num_processes)

    def _eval_loss(self) -> float:
        """The eval set's loss, each process scoring its share (the model is the same on
        each, so the number is a one-process run's)."""
        from ..eval.evaluate import eval_loss

        with self.parallel.gathered():
            share = eval_loss(
                self.model,
                self._eval_share().examples,
                self.loaded.tokenizer.pad_token_id,
                batch_size=self.cfg.eval_batch_size,
                autocast=self.accelerator.autocast,
            )
        total = torch.tensor(
            [share["loss"] * share["target_tokens"], share["target_tokens"]],
            dtype=torch.float64,
            device=self.device,
        )
        loss_sum, count = self.parallel.sum(total).tolist()
        return loss_sum / max(count, 1)

    def _finish(
        self, mem: PeakMemory, train_time: float, tokens: int, step_times: list[float]
    ) -> TrainResult:
        self._gather_statistics()
        with self.parallel.gathered():  # whole weights on each process (FSDP2) until written
            return self._evaluate_and_write(mem, train_time, tokens, step_times)

    def _evaluate(self) -> tuple[dict, dict | None]:
        """The eval set's metrics, each process evaluating its share (the main one also the
        decode latency), gathered on every process."""
        from ..eval.evaluate import detect_task, evaluate, label_set, merge_evaluations

        cfg = self.cfg
        task = detect_task(self.train_ds) if cfg.task == "auto" else cfg.task
        assert self.eval_ds is not None
        labels = (
            label_set(self.train_ds.records + self.eval_ds.records)
            if task == "classification"
            else None
        )
        share = self._eval_share()
        result: tuple[dict, dict | None] = ({}, None)
        if share.records:
            with self._method_context():
                result = evaluate(
                    self.model,
                    self.loaded.tokenizer,
                    share,
                    task=task,
                    labels=labels,
                    batch_size=cfg.eval_batch_size,
                    latency=self.accelerator.is_main_process,
                    autocast=self.accelerator.autocast,
                    progress=cfg.progress and self.accelerator.is_main_process,
                )
        if self.accelerator.num_processes == 1:
            return result
        from accelerate.utils import gather_object

        return merge_evaluations(gather_object([result]))

    def _evaluate_and_write(
        self, mem: PeakMemory, train_time: float, tokens: int, step_times: list[float]
    ) -> TrainResult:
        cfg = self.cfg
        main = self.accelerator.is_main_process
        eval_metrics, details = self._evaluate() if self.eval_ds is not None else ({}, None)
        losses = [h["loss"] for h in self.history if "loss" in h]
        summary = RunSummary(
            method=cfg.method,
            steps=self.step,
            freeze_below=self.freeze_k,
            trainable_params=self.trainable,
            total_params=self.total,
            train_time_s=train_time,
            tokens_per_s=tokens / train_time if train_time else None,
            step_time_p50_s=percentile(step_times, 50) if step_times else None,
            peak_memory_bytes=mem.peak_bytes,
            peak_memory_kind=mem.kind,
            final_train_loss=float(np.mean(losses[-10:])) if losses else None,
            device=str(self.device),
            lr=self.lr,
            fused_kernels=self.fused_kernels or None,
            frozen_cache=self.frozen_cache.summary() if self.frozen_cache else None,
            task=eval_metrics.get("task"),
        )
        summary.update({f"eval_{k}": v for k, v in eval_metrics.items() if k != "task"})
        summary.update(self.method.summary(self.model))
        written: dict[str, Any] = {}
        manifest: dict[str, Any] = {}
        # the main process writes the delta, the summary and the reports; a failure there
        # ends the others too (they wait for it in _on_main)
        self._on_main(lambda: written.update(self._write_delta(summary, manifest)))
        delta_dir = self.out / "delta"
        return TrainResult(
            self.out,
            delta_dir,
            manifest,
            written or summary.to_dict(),
            self.history,
            self.model,
            self.loaded,
            self.method,
            self.eval_ds,
            details if main else None,
            run_summary=summary,
            main_process=main,
        )

    def _write_delta(self, summary: RunSummary, manifest_out: dict[str, Any]) -> dict[str, Any]:
        """Save the delta and summary.json (main process); fill ``manifest_out``, return
        the summary as written."""
        cfg = self.cfg
        base = {
            "fingerprint": self.base_fingerprint,
            "name": self.loaded.name,
            "source": self.loaded.source,
            "architecture": type(base_model(self.model)).__name__,
            "num_layers": len(decoder_layers(self.model)),
        }
        extra = {
            "dataset": {
                "fingerprint": self.train_ds.fingerprint(),
                "path": self.train_ds.path,
                "shape": self.train_ds.shape,
                "examples": len(self.train_ds.records),
            },
            "training": asdict(cfg),
            "metrics": summary.to_dict(),  # no delta_bytes: the delta is being written
            "auto_freeze": self.auto_freeze,
            "lr_search": self.lr_search.to_dict() if self.lr_search else None,
            # options lowered on --resume (after a divergence), by the step they took effect
            "resume_changes": [r for r in self.history if r.get("event") == "resumed"],
            "processes": {"count": self.parallel.world, "strategy": self.parallel.kind},
            "curve": loss_curve(self.history),  # for comparing versions without their runs
        }
        manifest = save_delta(
            self.out / "delta",
            self.method,
            self.model,
            base=base,
            layers=self.layers,
            extra=extra,
            replace=True,
        )
        manifest_out.update(manifest)
        summary.delta_bytes = delta_bytes(manifest)
        written = summary.to_dict()
        write_json(self.out / "summary.json", written)
        if self.accelerator.trackers:
            self.accelerator.log(
                {k: v for k, v in trackers.numeric(written).items() if k.startswith("eval_")},
                step=self.step,
            )
        if not cfg.keep_checkpoint:
            for p in (self.ckpt_dir, self.ckpt_dir.with_name("checkpoint.old")):
                shutil.rmtree(p, ignore_errors=True)
        return written


def loss_curve(history: list[dict], points: int = 400) -> dict[str, list]:
    """The training loss by step, thinned to about ``points`` (the last step always kept)."""
    rows = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    stride = max(1, -(-len(rows) // points))
    kept = rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])
    return {"step": [s for s, _ in kept], "loss": [round(float(v), 6) for _, v in kept]}


def train(cfg: TrainConfig, loaded: LoadedModel | None = None) -> TrainResult:
    """Run a whole training job; see :class:`TrainConfig` for the options."""
    return Trainer(cfg, loaded).run()
