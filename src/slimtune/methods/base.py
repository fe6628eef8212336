"""The interface every fine-tuning method implements.

A method turns a frozen base model into a trainable one (only in the layers it is given),
and moves its trained state to and from a delta folder, and back onto a model
(:meth:`Method.attach`). Whether that state can be merged into the base weights, its
default learning rate and whether its folder is peft's own format are the method's to say,
so nothing outside ``methods/`` decides by a method's name. :func:`register_method` adds a
method to :data:`METHODS`, where training, apply and the store find it by name.
"""

from __future__ import annotations

import contextlib
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import torch
from torch import nn

from ..errors import UserInputError
from ..options import check_types

# Field metadata of an option ``slimtune sweep`` may take a list of values for (what
# ``option(..., sweep=True)`` sets; ``field(default=8, metadata=SWEEP)`` still works).
SWEEP = {"sweep": True}

_Config = TypeVar("_Config", bound="MethodConfig")


def option(
    default: Any = MISSING,
    *,
    flag: str | None = None,
    help: str = "",
    sweep: bool = False,
    default_factory: Any = MISSING,
    shown_default: str | None = None,
) -> Any:
    """An options-dataclass field that the CLI exposes as ``--FLAG`` (default: the field
    name with dashes), e.g. ``r: int = option(8, flag="lora-r", help="LoRA rank",
    sweep=True)``. Declared once here, it gives ``train``/``sweep`` their flag, its help and
    YAML key (the flag with underscores) and, with ``sweep``, a place in the sweep grid;
    methods that declare the same flag share it (same option name and type required).
    ``shown_default`` is how the help states a default that is resolved later (a ``None``
    that ``__post_init__`` replaces)."""
    cli = {"flag": flag, "help": help, "shown_default": shown_default}
    metadata: dict[str, Any] = {"cli": cli, "sweep": sweep}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CliOption:
    """One option a method exposes on the command line (see :func:`option`)."""

    name: str  # the option's field name, e.g. ``r``
    flag: str  # without dashes in front, e.g. ``lora-r``
    kind: Any  # the value type without ``None``: int, float, str, bool or list[str]
    default: Any
    help: str
    sweep: bool
    shown_default: str | None = None  # the help's wording of a default resolved later

    @property
    def dest(self) -> str:
        """The argparse destination and YAML key, e.g. ``lora_r``."""
        return self.flag.replace("-", "_")


def _not_none(hint: Any) -> Any:
    """``X | None`` -> ``X`` (the type a flag's value has)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@dataclass
class MethodConfig:
    """Options of a method; subclasses add fields. Unknown keys are an error."""

    @classmethod
    def sweepable(cls) -> dict[str, type]:
        """The options marked sweepable (``option(..., sweep=True)``), with the type of
        their values (to parse a sweep's comma-separated lists): ``int | None`` gives
        ``int``, as for the option's flag."""
        hints = get_type_hints(cls)
        return {f.name: _not_none(hints[f.name]) for f in fields(cls) if f.metadata.get("sweep")}

    @classmethod
    def cli_options(cls) -> list[CliOption]:
        """The options declared with :func:`option`, in field order: what the CLI builds
        its method flags from."""
        hints = get_type_hints(cls)
        out = []
        for f in fields(cls):
            cli = f.metadata.get("cli")
            if cli is None:
                continue
            default = (
                f.default_factory()
                if f.default_factory is not MISSING
                else (None if f.default is MISSING else f.default)
            )
            out.append(
                CliOption(
                    f.name,
                    (cli["flag"] or f.name).replace("_", "-"),
                    _not_none(hints[f.name]),
                    default,
                    cli["help"],
                    bool(f.metadata.get("sweep")),
                    cli.get("shown_default"),
                )
            )
        return out

    @classmethod
    def from_dict(
        cls: type[_Config], options: dict[str, Any], where: str = "method options"
    ) -> _Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserInputError(
                f"{where}: unknown option(s) {unknown} for this method; known: {sorted(known)}"
            )
        return cls(**check_types(cls, options, where))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Attachment:
    """A delta attached to a model by :meth:`Method.attach`."""

    model: nn.Module  # the model to run (possibly a wrapper around the base)
    merged: bool  # whether the delta ended up in the base weights
    # Takes the delta off, restoring the base bit for bit; returns the base model when it
    # is not the object given to attach (e.g. unwrapped from peft), else None.
    undo: Callable[[], nn.Module | None]


class Method(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Whether the delta can be folded into the base weights (``apply --merge``, model folders).
    mergeable: ClassVar[bool] = True
    why_not_mergeable: ClassVar[str] = ""  # said when a merge is refused
    # The quantized bases (``--quantize``) it trains on: its delta runs beside the frozen
    # quantized weights; a method that writes into the base weights takes none.
    quantizations: ClassVar[tuple[str, ...]] = ("nf4", "int8")
    why_not_quantized: ClassVar[str] = ""  # said when --quantize is refused
    # --fsdp: its trained tensors can be sharded like the base's (FSDP2 gathers them
    # layer by layer); methods that index or route into a layer's weights cannot
    shardable: ClassVar[bool] = False
    why_not_sharded: ClassVar[str] = "its delta indexes into whole weights"
    # a step may leave some trainable tensors without a gradient (an expert no token
    # chose): DDP must look for them after each forward
    unused_parameters: ClassVar[bool] = False
    # Serving: rows of different deltas of this method run in one forward over the base
    # (peft's per-row ``adapter_names``; the delta sits beside the base weights, unmerged)
    mixes_in_batch: ClassVar[bool] = False
    # The learning rate when the run does not set one; with ``auto_lr`` the centre of the
    # range test (training/lr_search.py) that then chooses it, as ``--lr auto`` does.
    default_lr: ClassVar[float] = 1e-4
    auto_lr: ClassVar[bool] = False
    # How its default rate follows the size of the model's weights: the swept rate x
    # scale ** this (training/lr_scale.py); 0: not at all
    lr_weight_exponent: ClassVar[float] = 0.0
    # Whether the delta folder is peft's own adapter format (exports to / imports from peft).
    peft_format: ClassVar[bool] = False
    why_not_peft: ClassVar[str] = ""  # said when an export to peft is refused
    peft_type: ClassVar[str | None] = None  # peft's ``peft_type`` this method imports
    # A delta that is a peft adapter *plus* a part peft cannot hold (rosa: LoRA + sparse):
    # the adapter part's files (peft's name -> ours). ``delta export --format peft`` then
    # writes the rest merged into a base (:meth:`merge_besides_peft`) and the adapter.
    peft_part: ClassVar[dict[str, str]] = {}
    # Files a delta cannot be applied without (one of them suffices); checked by verify.
    delta_files: ClassVar[tuple[str, ...]] = ()
    # For the planner's cost model: whether a run with no layer frozen also trains the
    # embeddings (tied to the head), and whether backward computes the base weights'
    # gradients (2x a layer's forward FLOPs) rather than only the activations' (1x).
    trains_embeddings: ClassVar[bool] = False
    weight_grads: ClassVar[bool] = False
    progress: bool = True  # bars while choosing from data; the trainer sets --no-progress here
    # An instance of config_class (a subclass narrows this annotation to its own options).
    config: MethodConfig

    def __init__(self, config: MethodConfig | dict | None = None) -> None:
        if config is None:
            config = self.config_class()
        elif isinstance(config, dict):
            config = self.config_class.from_dict(config)
        self.config = config
        # the run's optimizer steps, set by the trainer before it trains (None: not known),
        # for a hook that plans around the last step
        self.run_steps: int | None = None

    @abstractmethod
    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        """Freeze the base and make the method's parameters in ``layers`` trainable.

        ``batches(n)``, when given, returns up to ``n`` calibration batches of the training
        data on the model's device (for methods that choose what to train from data).
        Returns the model to train (possibly a wrapper around ``model``).
        """

    @abstractmethod
    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the trained state (only it, never the base) into ``folder``."""

    @classmethod
    @abstractmethod
    def attach(
        cls, model: nn.Module, folder: Path, manifest: dict[str, Any], *, merge: bool
    ) -> Attachment:
        """Put the (already verified) delta in ``folder`` onto the base ``model``.

        ``merge`` asks for the delta in the base weights (to write a model folder); a method
        that runs unmerged otherwise (e.g. peft) merges only then. The undo must restore the
        base bit for bit, so hot swapping never drifts.
        """

    @classmethod
    def merge_besides_peft(cls, model: nn.Module, folder: Path, manifest: dict[str, Any]) -> None:
        """Merge into ``model`` the part of the delta that is not in :attr:`peft_part`."""
        raise NotImplementedError(f"{cls.name} has no peft part")

    @classmethod
    def imports_peft(cls, config: dict[str, Any]) -> bool:
        """Whether a peft adapter with this adapter_config.json is stored as this method
        (by ``peft_type``). Where a method and its subclass both claim one, the
        subclass wins, so a LoRA variant claims its flag without LoRA knowing of it."""
        return (
            cls.peft_format
            and cls.peft_type is not None
            and config.get("peft_type") == cls.peft_type
        )

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """This method's options describing an imported peft adapter (``config`` is its
        adapter_config.json, ``model`` the base with it attached); for list/show/diff."""
        raise NotImplementedError(f"{cls.name} does not import peft adapters")

    def trainable_state(self, model: nn.Module) -> dict:
        """Tensors a checkpoint must hold to resume: the trainable parameters by name, and
        whatever :meth:`extra_state` adds."""
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        state.update(self.extra_state(model))
        return state

    def extra_state(self, model: nn.Module) -> dict:
        """Non-parameter tensors that change during training (none for most methods)."""
        return {}

    def gather_statistics(  # noqa: B027
        self, model: nn.Module, total: Callable[[torch.Tensor], torch.Tensor], main: bool
    ) -> None:
        """With several processes, called on each before anything is written: statistics
        each counted on its share of the data (e.g. expert usage) summed (``total``) into
        the main process' copy, which alone writes; the others restart from zero, so a
        later sum counts every token once. Nothing for most methods."""

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Training state outside tensors that a checkpoint must keep for a bit-identical
        resume (e.g. a pending sparse regrow), as JSON values; none for most methods."""
        return {}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` returned (after the checkpoint's tensors)."""

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:  # noqa: B027
        """Called after every optimizer step (e.g. to regrow a sparse selection); ``step``
        counts from 0, :attr:`run_steps` is the run's total."""

    def param_groups(self, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; a method may give its delta its own decay."""
        return [{"params": params, "weight_decay": weight_decay}]

    def auxiliary_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A loss term of the last forward pass to add to the task loss (e.g. a router's
        load balancing), already weighted; None for most methods."""
        return None

    def compute_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Entered around the training steps when they run under autocast (bf16/fp16): a
        method may then compute in the autocast dtype while its weights stay fp32."""
        return contextlib.nullcontext()

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Numbers to log with each optimizer step (e.g. the balancing loss)."""
        return {}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific facts for the run summary (e.g. active vs total parameters)."""
        return {}


METHODS: dict[str, type[Method]] = {}
# Flag names a method option may not take: the training options' own, given by
# training.config when it is imported (training builds on methods, not the reverse).
RESERVED_FLAGS: set[str] = set()


def reserve_flags(names: set[str]) -> None:
    """Keep methods registered from now on off these flag names (see ``_check_flags``)."""
    RESERVED_FLAGS.update(names)


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` known by its ``name`` to training, apply and the store (use it as a
    class decorator); a second, different class under a taken name is an error, and so is
    a CLI flag clash (:func:`_check_flags`), refused here so one bad method cannot break
    the parser of every command."""
    known = METHODS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {known.__qualname__}")
    _check_flags(cls)
    METHODS[cls.name] = cls
    return cls


def _check_flags(cls: type[Method]) -> None:
    """Methods declaring the same flag share it, so they must give it the same option name
    and value type; and no flag may be one of train's own options or keys."""

    def kind(tp: Any) -> str:
        return str(getattr(tp, "__name__", tp)) if typing.get_origin(tp) is None else str(tp)

    reserved = RESERVED_FLAGS
    for o in cls.config_class.cli_options():
        if o.dest in reserved:
            raise ValueError(
                f"--{o.flag} (method {cls.name}) is an option train already has; "
                "declare the method option with another flag=..."
            )
        for name, other in METHODS.items():
            for p in other.config_class.cli_options() if name != cls.name else ():
                if p.dest == o.dest and (p.name, p.kind) != (o.name, o.kind):
                    raise ValueError(
                        f"--{o.flag} is declared by method {name!r} for its option "
                        f"{p.name!r} ({kind(p.kind)}) and by method {cls.name!r} for "
                        f"{o.name!r} ({kind(o.kind)}): methods sharing a flag must give it "
                        "the same option name and type (or declare another flag=...)"
                    )


def unregister_method(name: str) -> None:
    """Forget the method ``name`` (for tests and plugins that add one for a while)."""
    METHODS.pop(name, None)
