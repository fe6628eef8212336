"""TrainConfig: every option of one training run, checked once when it is made.

The CLI, YAML files and the Python API all fill it by field name. The methods are imported
where used, not here: registering a method reads :func:`reserved_keys` while the methods
package is still being imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..data import in_memory
from ..errors import UserInputError
from ..methods import METHODS, Method, method_class
from ..methods.base import reserve_flags
from ..model.quantize import QUANTIZATIONS
from ..options import check_types
from ..salf.analysis import DEFAULT_KEEP

# Flags that switch a TrainConfig field off: flag name -> field name.
NEGATED_FLAGS = {"no_progress": "progress", "no_cache_frozen": "cache_frozen"}


@dataclass
class TrainConfig:
    """Every option of a training run; the CLI and YAML files fill it by field name."""

    data: str | None = None
    model: str = "default"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    freeze_below: int = 0
    freeze: str | None = None  # "auto": SALF analysis (+ budget policy) chooses freeze_below
    # numbers too, as options.parse_size/parse_duration read them (bytes, seconds)
    budget_memory: str | float | None = (
        None  # e.g. "6GiB": with freeze auto, unfreeze while it fits
    )
    budget_step_time: str | float | None = None  # e.g. "1.5s" per optimizer step
    keep: float = DEFAULT_KEEP  # share of the expected gain --freeze auto keeps
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | Literal["auto"] | None = None  # auto: a range test (training/lr_search.py)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 512
    pack: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer for training (model/compile.py)
    # keep the frozen layers' output per example (salf/frozen_cache.py); "auto": where a
    # run sees its data twice or more in one process and the states fit
    cache_frozen: bool | Literal["auto"] = "auto"
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoint: bool = False
    output_dir: str = "runs/train"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    precision: str = "auto"
    quantize: str = "none"  # nf4 or int8: the frozen base's block linears (model.quantize)
    fsdp: bool = False  # several processes: shard weights, gradients, optimizer (FSDP2)
    device: str = "auto"
    eval_batch_size: int = 16
    task: str = "auto"
    progress: bool = True
    report_to: str | None = None  # experiment trackers, comma-separated (trackers.TRACKERS)

    def __post_init__(self) -> None:
        # Rows given as objects (a datasets.Dataset, a list of dicts) become a "memory:HASH"
        # spec, so the identity, the manifest and resume see a string naming their content.
        self.data, self.eval_data = in_memory(self.data), in_memory(self.eval_data)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"{where}: unknown option(s) {unknown}")
        return cls(**check_types(cls, values, where)).validated(where)

    def validated(self, where: str | None = None) -> TrainConfig:
        """Check every field and the method's options; ``where`` (a YAML file, "command
        line") names the source in every error."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserInputError(f"{where}: {msg}" if where else msg)

        current = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in check_types(type(self), current, "training options").items():
            setattr(self, k, v)

        need(bool(self.data), "no training data: pass --data FILE")
        need(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(
            self.lr is None or self.lr == "auto" or (isinstance(self.lr, float) and self.lr > 0),
            f"lr must be a number > 0 or 'auto', got {self.lr!r}",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(
            0 <= self.eval_fraction < 1,
            f"eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        need(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}")
        need(self.freeze_below >= 0, f"freeze_below must be >= 0, got {self.freeze_below}")
        need(
            self.precision in ("auto", "bf16", "fp16", "fp32"),
            f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}",
        )
        need(self.save_every >= 0 and self.eval_every >= 0, "save_every/eval_every must be >= 0")
        need(not (self.resume and self.overwrite), "--resume and --overwrite exclude each other")
        need(
            self.freeze in (None, "auto"),
            f"freeze must be 'auto' (or use freeze_below), got {self.freeze!r}",
        )
        need(
            self.freeze == "auto" or not (self.budget_memory or self.budget_step_time),
            "--budget-memory/--budget-step-time need --freeze auto",
        )
        need(0 < self.keep <= 1, f"keep must be in (0, 1], got {self.keep}")
        from ..eval.tasks import TASKS
        from ..options import parse_duration, parse_size

        need(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        try:  # now, not after the model, the data and the analysis
            parse_size(self.budget_memory)
            parse_duration(self.budget_step_time)
        except UserInputError as e:
            need(False, str(e))
        need(
            self.quantize in QUANTIZATIONS,
            f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}",
        )
        need(
            self.quantize == "none" or self.precision != "fp16",
            "--quantize with --precision fp16 is not supported; use bf16 (or auto)",
        )
        # unknown method / bad options: fail now, naming where the options came from
        cls = method_class(self.method)
        about = f"{where}: method options" if where else "method options"
        cls(cls.config_class.from_dict(self.method_options, about))
        need(
            self.quantize == "none" or self.quantize in cls.quantizations,
            f"--method {self.method} cannot train on a quantized base (--quantize "
            f"{self.quantize}): {cls.why_not_quantized}",
        )
        need(
            not self.fsdp or cls.shardable,
            f"--method {self.method} cannot be sharded (--fsdp): {cls.why_not_sharded}; "
            "without --fsdp each process holds the whole model (DDP)",
        )
        need(
            not self.compile or _torch_at_least(2, 5),
            "--compile needs torch >= 2.5 (its decoder layers share one compiled graph "
            "there, not one each)",
        )
        need(
            not (self.fsdp and self.compile),
            "--compile with --fsdp is not supported (FSDP2's hooks on the compiled layers "
            "are untested); drop one of them",
        )
        need(
            self.cache_frozen is not True or self.freeze == "auto" or self.freeze_below > 0,
            "--cache-frozen keeps the frozen layers' output: it needs --freeze-below K "
            "or --freeze auto",
        )
        need(
            not (self.cache_frozen is True and self.fsdp),
            "--cache-frozen with --fsdp is not supported (the sharded frozen layers would "
            "still gather their weights every step); drop one of them",
        )
        need(
            not (self.fsdp and self.quantize != "none"),
            "--fsdp with --quantize is not supported: a quantized base is small enough to "
            "be held whole by each process (drop --fsdp)",
        )
        return self

    @property
    def learning_rate(self) -> float:
        """``lr`` when set, else the method's swept default, unscaled: the trainer scales it
        to the model's weights where the method's rate follows them
        (``Trainer.default_lr``, training/lr_scale.py), and with ``lr="auto"`` centres
        the range test there."""
        if isinstance(self.lr, float):
            return self.lr
        method = METHODS.get(self.method)
        return method.default_lr if method is not None else Method.default_lr

    @property
    def lr_auto(self) -> bool:
        """Whether a range test chooses the rate: ``lr="auto"``, or no ``lr`` for a method
        whose default is to (``Method.auto_lr``: full fine-tuning)."""
        if self.lr == "auto":
            return True
        method = METHODS.get(self.method)
        return self.lr is None and method is not None and method.auto_lr

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues."""
        keep = (
            "data",
            "model",
            "method",
            "method_options",
            "freeze_below",
            "freeze",
            "budget_memory",
            "budget_step_time",
            "keep",
            "max_steps",
            "batch_size",
            "grad_accum",
            "lr",
            "weight_decay",
            "warmup_ratio",
            "max_grad_norm",
            "max_length",
            "pack",
            "quantize",
            "seed",
            "eval_fraction",
        )
        return {k: getattr(self, k) for k in keep}


@dataclass
class StoreOptions:
    """Where ``train`` stores its delta (flags or YAML keys of the same names)."""

    store: str | None = None
    no_store: bool = False
    parent: str | None = None
    note: str | None = None


def _torch_at_least(major: int, minor: int) -> bool:
    import torch

    found = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return found >= (major, minor)


def reserved_keys() -> set[str]:
    """Names a method option's flag (and so its YAML key) must not take: train's own options
    and keys. ``register_method`` refuses a method declaring one, so the train parser is
    always built."""
    return (
        {f.name for f in fields(TrainConfig)}
        | {f.name for f in fields(StoreOptions)}
        | set(NEGATED_FLAGS)
        | {"config", "option", "help"}
    )


reserve_flags(reserved_keys())  # methods registered from now on keep off these flags
