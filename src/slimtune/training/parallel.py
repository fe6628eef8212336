"""Several processes sharing one optimizer step: DDP through accelerate, or FSDP2.

Both act in the forward of the module they wrap (DDP readies its gradient buckets there,
FSDP2 gathers the root's parameters), and slimtune's loss does not run the model's
forward: it runs the backbone, then the head on target rows only (``training/loss.py``).
So what they wrap is :class:`StepLoss`, the model and its loss as one forward.

* DDP (the default with several processes): every process holds the whole model; the
  gradients are all-reduced in buckets while backward runs, once per optimizer step
  (``no_sync`` on the step's other micro-batches).
* FSDP2 (``--fsdp``): the parameters, gradients and optimizer state of each decoder layer
  (and of the rest of the model) are sharded across the processes and gathered one layer
  at a time for its forward and backward: for bases whose training state does not fit
  one device. Gradients are reduce-scattered after every micro-batch, so accumulation
  holds sharded gradients only.

One process alone writes files; checkpoints and deltas hold whole tensors (gathered under
FSDP), so a run resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..salf.frozen_cache import FrozenOutputCache
from .loss import target_loss


class StepLoss(nn.Module):
    """``model`` and its training loss (plus a method's auxiliary loss) as one forward."""

    def __init__(
        self,
        model: nn.Module,
        aux_loss: Callable[[], torch.Tensor | None] | None = None,
        frozen_cache: FrozenOutputCache | None = None,
    ):
        super().__init__()
        self.model = model
        self._aux_loss = aux_loss
        self._frozen_cache = frozen_cache

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``batch["example_ids"]``, where the trainer names the batch's examples, lets
        the frozen layers' cache serve it."""
        ids = batch.get("example_ids")
        serving = (
            self._frozen_cache.serving(ids, batch["attention_mask"])
            if self._frozen_cache is not None and ids is not None
            else contextlib.nullcontext()
        )
        with serving:
            loss, _ = target_loss(self.model, batch)
        return loss, (self._aux_loss() if self._aux_loss is not None else None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process' shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class Parallel:
    """How this run's processes share a step; ``kind`` is "none" for one process.

    ``module`` is what the step's forward runs through: the model's :class:`StepLoss`,
    wrapped by DDP or sharded by FSDP2 when there are several processes.
    """

    def __init__(
        self, kind: str, step: StepLoss, module: nn.Module | None = None, accelerator: Any = None
    ) -> None:
        self.kind = kind
        self.step = step
        self.module = module if module is not None else step
        self._accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (itself with one)."""
        return self._accelerator.reduce(t, "sum") if self.world > 1 else t

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layers: Iterable[nn.Module],
        accelerator: Any,
        *,
        fsdp: bool,
        aux_loss: Callable[[], torch.Tensor | None] | None = None,
        frozen_cache: FrozenOutputCache | None = None,
    ) -> Parallel:
        """Wrap ``model`` for ``accelerator``'s processes (``layers``: its decoder layers,
        FSDP2's units)."""
        step = StepLoss(model, aux_loss, frozen_cache)
        if accelerator.num_processes == 1:
            return cls("none", step)
        if not fsdp:  # accelerate wraps it in DDP with the handler _accelerator gave it
            ddp = accelerator.prepare_model(step, device_placement=False)
            return cls("ddp", step, ddp, accelerator)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(step, mesh=mesh)  # the root: embeddings, final norm, head
        return cls("fsdp", step, step, accelerator)

    def loss(self, batch: dict[str, torch.Tensor], *, sync: bool = True):
        """The summed target loss and the auxiliary loss of ``batch``. ``sync=False`` (a
        step's micro-batches but its last) defers DDP's all-reduce; FSDP2 reduce-scatters
        every micro-batch (unsharded gradients held across a step would undo the
        sharding)."""
        if self.kind == "ddp" and not sync:
            with self._accelerator.no_sync(self.module):
                return self.module(batch)
        return self.module(batch)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Whole parameters on every process for the block (each runs it; call it on all):
        for evaluating a share of the data and writing the delta. A no-op unless sharded."""
        if self.kind != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for m in units:  # kept whole through forwards, which would otherwise reshard
            m.set_reshard_after_forward(False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state for a checkpoint (call on every process): whole tensors
        keyed by the model's parameter names, whatever the sharding, so a run resumes
        with or without FSDP and with any number of processes."""
        if self.kind != "fsdp":
            return _renamed(optimizer.state_dict(), self._names_by_index(optimizer).__getitem__)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        state = get_optimizer_state_dict(
            self.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not state:  # cpu_offload gathers on the main process only, which writes it
            return {}
        return _renamed(state, lambda name: name.removeprefix("model."))  # the StepLoss's

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state` wrote (or, without FSDP, a plain
        ``state_dict()`` keyed by index, as checkpoints of slimtune 0.1 hold)."""
        by_index = all(isinstance(k, int) for k in state["state"])
        if by_index and self.kind == "fsdp":
            raise ValueError("a checkpoint of an older slimtune: resume it without --fsdp")
        # the update's kernel (fused on CUDA, step.adamw) is this run's choice: torch would
        # take the checkpoint's, and a run resumed elsewhere may not have that kernel
        kernel = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
        state = {**state, "param_groups": [{**g, **kernel} for g in state["param_groups"]]}
        if self.kind != "fsdp":
            if not by_index:
                index = {n: i for i, n in self._names_by_index(optimizer).items()}
                state = _renamed(state, index.__getitem__)
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.module,
            optimizer,
            _renamed(state, lambda name: f"model.{name}"),
            options=StateDictOptions(full_state_dict=True),
        )

    def _names_by_index(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """The index ``optimizer.state_dict()`` gives each parameter -> its name in the model."""
        names = {id(p): n for n, p in self.step.model.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return {i: names[id(p)] for i, p in enumerate(params)}

    def copy_into(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """``target[...] = value`` for a parameter or buffer, sharded or not (each process
        keeps its own shard of the whole ``value``)."""
        mesh = getattr(target, "device_mesh", None)
        if mesh is None:
            target.data.copy_(value)
            return
        from torch.distributed.tensor import distribute_tensor

        whole = value.to(device=_local(target).device, dtype=target.dtype)
        _local(target.data).copy_(_local(distribute_tensor(whole, mesh, target.placements)))

    def nonfinite_norm(self, params: list[nn.Parameter]) -> float | None:
        """The norm of ``params`` if it is NaN/inf (some entry is, on some process), else
        None: one fused reduction and one sync per step."""
        norm = torch.linalg.vector_norm(
            torch.stack(
                torch._foreach_norm([_local(p.detach()) for p in params], 2, dtype=torch.float32)
            )
        )
        if self.kind == "fsdp":  # each process holds a shard: the squares sum across them
            norm = self.sum(norm.square()).sqrt()
        value = float(norm)
        return None if math.isfinite(value) else value


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered on every process; a plain tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _renamed(state: dict[str, Any], rename: Callable[[Any], Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter key passed through ``rename``."""
    return {
        "state": {rename(k): v for k, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [rename(k) for k in g["params"]]} for g in state["param_groups"]
        ],
    }
