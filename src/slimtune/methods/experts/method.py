"""Routed expert adapters: per decoder layer, E small low-rank experts and a learned router;
each token runs only its top-k experts (conditional computation).

One adapted layer::

    p      = softmax(router(h / rms(h) - c))    h: the layer's input hidden state, per token;
                                                c: its mean on calibration batches
    top    = the k largest entries of p; gates g = p[top] / sum(p[top])
    y      = W x + (alpha / r) * sum_{e in top} g_e * B_e A_e x     for every adapted linear W

An expert is a LoRA pair (A_e: r x in, B_e: out x r) on each adapted linear of the layer, so
one routing decision per token and layer picks the same experts for q, k, v, ..., down.

What is dense and what is not:

* dense, every token: the base layer, and the router (E logits per token: d x E MACs);
* conditional, only the routed tokens: each token runs its k experts and no other.
  Adapter FLOPs per token are ``k * r * (in + out)`` per linear, whatever E is; an expert
  no token chose is not read at all (and gets no gradient).
* Padding tokens (``attention_mask == 0``) are not routed.

Implementations of the same sum:

* inference on CUDA: the fused Triton kernel in ``cuda_kernel.py`` (tokens tiled by their
  set of k experts; one read and one write of each output row); on CPU (fp32) the fused C
  kernel in ``cpu_kernel.py`` (the same, a token at a time);
* training on CUDA with small experts (E * r <= ``DENSE_MAX_WIDTH``, e.g. 8 x 8): the dense
  path. Every token runs *every* expert's A (one GEMM of width E * r), the rows of the
  experts it did not choose are multiplied by a zero gate, then one GEMM by all the B's.
  That is E / k times the adapter FLOPs of routing, but a GEMM this narrow is bound by
  reading x, not by its FLOPs, so it costs what one LoRA of rank E * r costs, and it needs
  no gathers, scatters or host syncs (which dominate the routed step on a GPU). Zero gates
  give zero gradients, so the result and the gradients are those of the routed sum;
  ``--expert-dispatch routed`` keeps conditional computation in training too;
* training elsewhere, and anywhere the kernel does not run: the gathered path. The token rows are
  gathered into groups, one per expert (``index_select``), each group runs through its A_e
  then B_e (one grouped GEMM per factor on CUDA SM90+, a loop over the experts that got
  tokens elsewhere), and each slot's gated result is added to its token's row of the base
  output (a deterministic accumulation).

Load balancing (Switch Transformer): ``aux = E * sum_e f_e * P_e`` with f_e the share of
routing slots given to expert e and P_e its mean router probability; 1 for perfectly even
routing, up to E when one expert takes everything. The trainer adds ``aux_weight * aux``
(averaged over layers) to the loss; only P_e carries gradient.

The routing cannot be folded into the base weights, so the delta says ``mergeable: false``
and applying it attaches these modules (``attach_experts``); removing them puts the original
``nn.Linear`` objects back, so the base is untouched bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...errors import DeltaError, UserInputError
from ...fileio import write_safetensors
from ...model.anatomy import base_model, decoder_layers, target_module_names
from ..base import Attachment, Method, MethodConfig, option, register_method
from .fused import fused_experts
from .layer import DENSE_MAX_WIDTH, DISPATCH, ExpertLinear, _mask_hook, _release_hook, _route_hook
from .routing import ExpertRouter

EXPERTS_FILE = "experts.safetensors"


@dataclass
class ExpertsOptions(MethodConfig):
    experts: int = option(8, help="experts per layer", sweep=True)
    top_k: int = option(2, help="experts each token runs", sweep=True)
    rank: int = option(8, flag="expert-rank", help="rank of each expert", sweep=True)
    alpha: float = 16.0
    aux_weight: float = option(0.01, help="weight of the load-balancing loss")
    # Short names of the linear modules to adapt; None = every linear layer in the blocks.
    target_modules: list[str] | None = option(
        None,
        flag="lora-targets",
        help="linear modules to adapt, comma-separated short names; default: every "
        "linear layer in the blocks",
    )
    dispatch: str = option(
        "auto",
        flag="expert-dispatch",
        help="how training computes the experts: routed (only each token's k experts), "
        "dense (every expert, the unchosen ones gated to zero) or auto (dense on CUDA "
        f"where experts x rank <= {DENSE_MAX_WIDTH}, routed elsewhere)",
    )
    calibration_batches: int = 4  # batches of training data that center the routers
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_batches < 0:
            raise UserInputError("calibration_batches must be >= 0")
        if self.experts < 1:
            raise UserInputError(f"experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise UserInputError(
                f"top_k must be between 1 and experts ({self.experts}), got {self.top_k}"
            )
        if self.rank < 1:
            raise UserInputError(f"expert rank must be >= 1, got {self.rank}")
        if self.aux_weight < 0:
            raise UserInputError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.dispatch not in DISPATCH:
            raise UserInputError(
                f"expert dispatch must be one of {', '.join(DISPATCH)}, got {self.dispatch!r}"
            )


@dataclass
class Attached:
    routers: dict[int, ExpertRouter]
    linears: dict[str, ExpertLinear]  # "layer.module path" -> adapter
    _undo: list

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _linear(root: nn.Module, path: str) -> nn.Linear:
    module = root.get_submodule(path)
    assert isinstance(module, nn.Linear)
    return module


def attach_experts(model: nn.Module, layers: list[int], cfg: ExpertsOptions) -> Attached:
    """Give each layer in ``layers`` a router and wrap its target linears in experts."""
    targets = target_module_names(model, cfg.target_modules, "experts")
    gen = torch.Generator().manual_seed(cfg.seed)
    blocks = decoder_layers(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    routers: dict[int, ExpertRouter] = {}
    linears: dict[str, ExpertLinear] = {}
    undo: list = []
    for i in layers:
        block = blocks[i]
        names = [
            n
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
        ]
        dev = next(block.parameters()).device
        size = hidden or _linear(block, names[0]).in_features
        router = ExpertRouter(size, cfg.experts, cfg.top_k, gen).to(dev)
        block.add_module("expert_router", router)
        routers[i] = router
        for name in names:
            base = _linear(block, name)
            adapter = ExpertLinear(base, router, cfg.rank, cfg.alpha, gen, dispatch=cfg.dispatch)
            _set_child(block, name, adapter)
            linears[f"{i}.{name}"] = adapter
            undo.append(lambda b=block, n=name, m=base: _set_child(b, n, m))
        handle = block.register_forward_pre_hook(_route_hook(router), with_kwargs=True)
        undo.append(handle.remove)
        undo.append(block.register_forward_hook(_release_hook(router)).remove)
        undo.append(lambda b=block: delattr(b, "expert_router"))
    # on the decoder stack, which the training loss runs without the model's own forward
    # (training/loss.py): a hook on the model would leave the routers an older batch's mask
    stack = getattr(base_model(model), "model", None)
    hooked = stack if isinstance(stack, nn.Module) else model
    handle = hooked.register_forward_pre_hook(_mask_hook(list(routers.values())), with_kwargs=True)
    undo.append(handle.remove)
    att = Attached(routers, linears, undo)
    model.__dict__["_slimtune_experts"] = att  # where attached() finds it
    undo.append(lambda: model.__dict__.pop("_slimtune_experts", None))
    return att


def attached(model: nn.Module) -> Attached:
    found = model.__dict__.get("_slimtune_experts")
    if found is None:
        raise UserInputError("this model has no expert adapters attached")
    return found


def expert_usage(model: nn.Module) -> dict[int, list[float]]:
    """Per adapted layer, how many routing slots each expert took (since attaching)."""
    return {i: r.usage.tolist() for i, r in attached(model).routers.items()}


def adapter_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total adapter parameters, and those one token actually runs (its k experts + routers)."""
    att = attached(model)
    total = active = 0
    for r in att.routers.values():
        total += r.weight.numel()
        active += r.weight.numel()
    for lin in att.linears.values():
        n = lin.lora_A.numel() + lin.lora_B.numel()
        total += n
        active += n * lin.router.top_k // lin.router.experts
    return {"adapter_params": total, "active_params_per_token": active}


def _delta_tensors(att: Attached) -> dict[str, torch.Tensor]:
    """The live tensors an experts delta holds, by their name in ``experts.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    for i, r in att.routers.items():
        tensors[f"layers.{i}.router"] = r.weight
        tensors[f"layers.{i}.usage"] = r.usage
        tensors[f"layers.{i}.center"] = r.center
    for key, lin in att.linears.items():
        layer, name = key.split(".", 1)
        tensors[f"layers.{layer}.{name}.lora_A"] = lin.lora_A
        tensors[f"layers.{layer}.{name}.lora_B"] = lin.lora_B
    return tensors


def save_experts(model: nn.Module, path: Path) -> None:
    """fp32 on disk; the usage counts stay fp64."""
    write_safetensors(
        path,
        {
            k: v.detach() if v.dtype == torch.float64 else v.detach().float()
            for k, v in _delta_tensors(attached(model)).items()
        },
    )


def load_experts(model: nn.Module, folder: Path, manifest: dict) -> Attached:
    """Attach the experts delta in ``folder`` as modules (it cannot merge); exact tensors."""
    try:
        cfg = ExpertsOptions.from_dict(manifest["method_config"], f"{folder}: method_config")
    except (UserInputError, TypeError) as e:
        raise DeltaError(f"{folder}: {e}") from e
    if not manifest.get("layers"):  # null reads as "not recorded"; routers need their layers
        raise DeltaError(f"{folder}: the manifest records no 'layers'; an experts delta needs them")
    layers = list(manifest["layers"])
    n = len(decoder_layers(model))
    if any(not 0 <= i < n for i in layers):
        raise DeltaError(f"{folder}: layers {layers} do not fit a model of {n} layers")
    try:
        tensors = load_file(str(folder / EXPERTS_FILE))
    except Exception as e:
        raise DeltaError(f"{folder / EXPERTS_FILE}: unreadable ({e})") from e
    att = attach_experts(model, layers, cfg)
    try:
        expected = _delta_tensors(att)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise DeltaError(
                f"{folder / EXPERTS_FILE}: tensors do not match the manifest "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        with torch.no_grad():
            for key, target in expected.items():
                value = tensors[key]
                if value.shape != target.shape:
                    raise DeltaError(
                        f"{folder / EXPERTS_FILE}: {key} has shape "
                        f"{tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(value)
    except DeltaError:
        att.remove()
        raise
    for r in att.routers.values():
        r.weight.requires_grad_(False)
    for lin in att.linears.values():  # serve in the base's dtype (bf16 on GPU): no cast per pass
        dtype = _serving_dtype(lin.base_layer, lin.lora_A.dtype)
        lin.lora_A.data = lin.lora_A.data.to(dtype)
        lin.lora_B.data = lin.lora_B.data.to(dtype)
        lin.lora_A.requires_grad_(False)
        lin.lora_B.requires_grad_(False)
    return att


def _serving_dtype(base_layer: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype ``base_layer`` computes in: its weight's, or for a quantized layer (packed
    integer weights) bitsandbytes' 4-bit compute dtype, else ``default``."""
    w = base_layer.weight
    assert isinstance(w, torch.Tensor)
    if w.dtype.is_floating_point:
        return w.dtype
    compute = getattr(base_layer, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else default


def center_routers(model: nn.Module, att: Attached, batches: list[dict]) -> None:
    """Set each router's ``center`` to the mean normalised input of its layer on
    ``batches`` (forward passes without gradients; padding excluded)."""
    was_training = model.training
    model.eval()
    routers = list(att.routers.values())
    for r in routers:
        r.calibration = [torch.zeros_like(r.center, dtype=torch.float32), 0]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        for r in routers:
            assert r.calibration is not None  # set above, cleared only below
            total, count = r.calibration
            if count:
                r.center.copy_(total / count)
    finally:
        for r in routers:
            r.calibration = None
        model.train(was_training)


@register_method
class ExpertsMethod(Method):
    name = "experts"
    config_class = ExpertsOptions
    config: ExpertsOptions
    mergeable = False
    why_not_mergeable = "its experts are routed per token"
    default_lr = 1e-3  # benchmarks/lr_sweep.py: the best swept rate on both tasks (BENCHMARKS.md)
    lr_weight_exponent = 0.5  # training/lr_scale.py
    delta_files = (EXPERTS_FILE,)
    why_not_sharded = "its experts are stacked per layer and routed per token"
    unused_parameters = True  # an expert no token of a process' batch chose

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._aux_seen: list[torch.Tensor] = []  # read once per step (one device sync)

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        if not layers:
            raise UserInputError("experts: no layer left to adapt (everything is frozen)")
        model.requires_grad_(False)
        att = attach_experts(model, layers, self.config)
        if batches is not None and self.config.calibration_batches > 0:
            center_routers(model, att, batches(self.config.calibration_batches))
        return model

    def compute_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Under autocast the dense path runs as one autograd function per linear on bf16
        copies of the experts made once per step (``fused.py``)."""
        return fused_experts(model, attached(model).linears.values())

    def auxiliary_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``aux_weight`` x the load-balancing loss of the last forward, averaged over layers."""
        routers = attached(model).routers.values()
        values = [r.last_aux for r in routers if r.last_aux is not None]
        for r in routers:
            r.last_aux = None
        if not values or self.config.aux_weight == 0:
            return None
        aux = torch.stack(values).mean()
        self._aux_seen.append(aux.detach())
        return self.config.aux_weight * aux

    def gather_statistics(
        self, model: nn.Module, total: Callable[[torch.Tensor], torch.Tensor], main: bool
    ) -> None:
        for r in attached(model).routers.values():
            usage = total(r.usage)
            r.usage.copy_(usage if main else torch.zeros_like(usage))

    def step_metrics(self, model: nn.Module) -> dict:
        seen, self._aux_seen = self._aux_seen, []
        return {"balance_loss": float(torch.stack(seen).float().mean())} if seen else {}

    def extra_state(self, model: nn.Module) -> dict:
        return {
            name: buf
            for name, buf in model.named_buffers()
            if name.endswith(("expert_router.usage", "expert_router.center"))
        }

    def summary(self, model: nn.Module) -> dict:
        return {
            **adapter_parameter_counts(model),
            "expert_usage": {str(k): v for k, v in expert_usage(model).items()},
        }

    def save(self, model: nn.Module, folder: Path) -> None:
        save_experts(model, folder / EXPERTS_FILE)

    @classmethod
    def attach(cls, model: nn.Module, folder: Path, manifest: dict, *, merge: bool) -> Attachment:
        """Attach the experts as modules (never merged); undo puts the original layers back."""
        return Attachment(model, False, load_experts(model, folder, manifest).remove)
