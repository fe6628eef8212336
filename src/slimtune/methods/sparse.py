"""Sparse fine-tuning: train a small, importance-chosen subset of the existing weights.

Each selected ``nn.Linear`` gets a :class:`SparseDelta`: the flat ``indices`` of its
selected entries, their trainable ``values`` (fp32, the only trainable tensors, so the
optimizer state is the size of the subset) and the base weights at those entries
(``base_values``, kept for an exact un-merge).

How the forward pass applies the sparse part: before each forward the selected entries of
the weight are written in place, ``W[idx] = base + values`` (a scatter of k elements), and
the layer runs its ordinary dense matmul, so training and inference cost what the dense
layer costs and the base weights are never duplicated. In backward, the gradient of the
values is the dense weight gradient ``g^T x`` gathered at ``idx``; that dense matrix exists
only inside this layer's backward and is freed before the next layer's.

Column structure (``structure="columns"``): each tensor trains whole input columns (every
row of a few columns ``j``, chosen by their summed importance). Entries anywhere cost a
dense ``g^T x`` per layer in backward (on a GPU that GEMM makes sparse at density 0.01
slower than LoRA) and keep the whole input ``x`` for it; with whole columns the values'
gradient is ``g^T x[:, cols]``, a GEMM the size of the density, and the forward keeps only
``x[:, cols]`` (less activation memory than LoRA, which keeps all of ``x``). The cost: a
coarser selection (a column's rows come together, whatever their own scores), and no
drop-and-regrow (it needs the dense gradient). Whether a delta's indices are whole columns
is read off the indices themselves (:func:`column_layout`), so the file format is the same
and a loaded or resumed delta with whole columns takes the fast path too.

Un-merging writes ``base_values`` back: bit for bit the original weights. The delta on disk
holds, per module, ``indices`` (int32 where they fit) and ``values``; applying it to a base
scatter-adds the values, removing it restores the saved entries.

On a quantized base (``--quantize``) the entries cannot be written into the weights: the
delta runs beside them, ``y = base_q(x) + x S^T`` (as SpIEL's 4-bit variant does), with
``S`` the (out, in) matrix holding the values at the indices: ``x[..., cols] V^T`` for whole
columns, a scattered dense ``S`` (one transient matrix per layer) for entries. The stored
delta is the same, so it applies to the full-precision base as well.

Optional drop-and-regrow (as in SpIEL): every ``regrow_every`` steps each tensor drops the
``regrow_fraction`` of its entries with the smallest |value| and grows as many new ones
where that step's dense gradient is largest, keeping the density fixed.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..errors import DeltaError, UserInputError
from ..fileio import write_safetensors
from ..model.anatomy import canonical_name, decoder_layers, linear_modules, target_module_names
from ..model.quantize import is_quantized, quantization_of, weight_shape
from .base import Attachment, Method, MethodConfig, option, register_method
from .compute_copies import mm_to
from .importance import (
    SCORERS,
    SELECTIONS,
    STRUCTURES,
    column_indices,
    importance_scores,
    select_top,
)

SPARSE_FILE = "sparse.safetensors"


def column_layout(
    indices: torch.Tensor, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor | None:
    """The sorted input columns when ``indices`` are exactly every entry of those columns of
    a weight of ``shape``, in :func:`~.importance.column_indices`' row-major order; else
    None (any other set or order takes the dense-gradient path)."""
    rows, width = shape[0], shape[1]
    n = indices.numel()
    if n == 0 or n % rows:
        return None
    cols = indices[: n // rows]
    if cols.numel() > width or int(cols[0]) < 0 or int(cols[-1]) >= width:
        return None
    if cols.numel() > 1 and not bool((cols[1:] > cols[:-1]).all()):
        return None
    if not torch.equal(indices, column_indices(cols, shape)):
        return None
    return cols.clone()


class SparseDelta(nn.Module):
    indices: torch.Tensor  # buffers, registered in __init__
    base_values: torch.Tensor
    cols: torch.Tensor | None  # not saved: derived from indices by find_layout()
    merged: torch.Tensor  # not saved: write()'s buffer

    def __init__(
        self,
        weight: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        beside: tuple[int, int] | None = None,
    ) -> None:
        """``beside``: the (out, in) shape of a quantized weight the delta runs beside
        (never written, so no base entries are kept)."""
        super().__init__()
        idx = indices.to(device=weight.device, dtype=torch.long)
        self.beside = beside is not None
        self.weight_shape = beside if beside is not None else tuple(weight.shape)
        self.register_buffer("indices", idx)
        base = (
            torch.zeros(0, device=weight.device)
            if beside is not None
            else weight.detach().view(-1)[idx].clone()
        )
        self.register_buffer("base_values", base)
        v = (
            torch.zeros(idx.numel(), dtype=torch.float32, device=weight.device)
            if values is None
            else values.to(device=weight.device, dtype=torch.float32)
        )
        self.values = nn.Parameter(v)
        self.register_buffer("cols", None, persistent=False)
        # write()'s base + values in the weight's dtype: a buffer, so it moves with the
        # module and torch.compile sees a tensor, not a None that becomes one (a recompile)
        merged = torch.empty(0 if beside else idx.numel(), dtype=weight.dtype, device=weight.device)
        self.register_buffer("merged", merged, persistent=False)
        self.find_layout()
        self.regrow_count = 0  # > 0: the next backward records where to grow this many entries
        self.regrow_candidates: torch.Tensor | None = None

    def find_layout(self) -> None:
        """Set ``cols`` (the column fast path) from the indices; call after they change."""
        self.cols = column_layout(self.indices, self.weight_shape)

    def write(self, weight: torch.Tensor) -> None:
        """``W[idx] = base + values`` in place (no autograd). One kernel adds in fp32 (the
        16-bit base promoted) and rounds once into a buffer of the weight's dtype, one
        copies it into the weight: no separate cast, a launch fewer per layer and pass where
        the eager GPU step is bound by the host."""
        with torch.no_grad():
            merged = self.merged
            if (merged.dtype, merged.device, merged.numel()) != (
                weight.dtype,
                weight.device,
                self.values.numel(),
            ):
                merged = self.merged = torch.empty_like(self.values, dtype=weight.dtype)
            torch.add(self.base_values, self.values.detach(), out=merged)
            weight.view(-1).index_copy_(0, self.indices, merged)

    def restore(self, weight: torch.Tensor) -> None:
        """``W[idx] = base``: the exact original entries."""
        with torch.no_grad():
            weight.view(-1).index_copy_(0, self.indices, self.base_values)

    def side_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x S^T``: the delta's share of the output, beside a quantized weight."""
        out, width = self.weight_shape
        if self.cols is not None:  # whole columns: (out, ncols) row-major, as the indices
            v = self.values.view(out, self.cols.numel()).to(x.dtype)
            return F.linear(x.index_select(-1, self.cols), v)
        return _BesideEntries.apply(x, self.values, self.indices, (out, width))

    def observe(self, grad_w: torch.Tensor) -> None:
        """Choose the regrow candidates from this backward's dense weight gradient. With
        several processes it is summed over them first (each holds its share of the
        batch), so every process grows the same entries."""
        scores = grad_w.detach().float().view(-1).clone()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(scores)
        scores.abs_()
        scores[self.indices] = -1.0
        # only entries not yet selected (topk past them would pick selected ones again)
        k = min(self.regrow_count, scores.numel() - self.indices.numel())
        self.regrow_candidates = torch.topk(scores, k).indices if k > 0 else None
        self.regrow_count = 0


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, delta: SparseDelta):
        delta.write(weight)
        ctx.delta, ctx.weight = delta, weight  # not saved tensors: the write bumps versions
        # whole columns: only x[..., cols] is needed (unless a regrow wants the dense grad)
        ctx.cols = None if delta.regrow_count else delta.cols
        ctx.x_dtype = x.dtype
        if ctx.cols is None:
            ctx.save_for_backward(x)
        else:
            # in x's dtype, as the dense path keeps x: backward casts (bf16 under autocast)
            ctx.save_for_backward(x.index_select(-1, ctx.cols))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors  # x[..., cols] on the column path
        w, delta = ctx.weight, ctx.delta
        g = grad_out.to(w.dtype)
        grad_x = (g @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(w.dtype)
        if ctx.cols is not None:  # (out, ncols), row-major: the order of delta.indices
            return grad_x, None, None, mm_to(g2.t(), x2, torch.float32).reshape(-1), None
        grad_w = g2.t() @ x2  # dense, lives only here
        if delta.regrow_count:
            delta.observe(grad_w)
        grad_values = grad_w.view(-1).index_select(0, delta.indices).float()
        return grad_x, None, None, grad_values, None


def _scattered(values: torch.Tensor, indices: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The dense (out, in) matrix holding ``values`` at ``indices`` (a transient)."""
    dense = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    return dense.index_copy_(0, indices, values.detach().to(dtype)).view(shape)


class _BesideEntries(torch.autograd.Function):
    """``x S^T`` for scattered entries beside a quantized weight. Autograd through a dense
    ``S`` would save that (out, in) matrix for backward, one per trained layer: a 16-bit
    copy of every trained weight held across the step, what quantizing the base saves.
    Only ``x`` is saved; ``S`` is scattered again in backward, and the values' gradient
    is read off the dense ``g^T x`` there (as the full-precision path does)."""

    @staticmethod
    def forward(ctx, x, values, indices, shape):
        ctx.save_for_backward(x, values, indices)
        ctx.shape = shape
        return F.linear(x, _scattered(values, indices, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        g = grad_out.reshape(-1, ctx.shape[0])
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            s = _scattered(values, indices, ctx.shape, g.dtype)
            grad_x = (g @ s).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x.reshape(-1, ctx.shape[1]).to(g.dtype)  # dense, lives only here
            grad_values = grad_w.view(-1).index_select(0, indices).to(values.dtype)
        return grad_x, grad_values, None, None


def delta_of(module: nn.Module) -> SparseDelta:
    """The :class:`SparseDelta` that :func:`attach` put on ``module``."""
    delta = module.sparse_delta
    assert isinstance(delta, SparseDelta)
    return delta


def _sparse_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    delta = delta_of(module)
    return _SparseDeltaLinear.apply(x, module.weight, module.bias, delta.values, delta)


def _beside_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A quantized layer's own forward plus the delta's share (autograd does the rest)."""
    return type(module).forward(module, x) + delta_of(module).side_output(x)


def attach(
    module: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None
) -> SparseDelta:
    beside = weight_shape(module) if is_quantized(module) else None
    delta = SparseDelta(module.weight, indices, values, beside=beside)
    module.sparse_delta = delta
    # a per-instance forward (detach_delta pops it again); a bound method, not a partial:
    # torch.compile guards on the function, shared by every layer, not on each partial
    forward = _beside_forward if beside else _sparse_forward
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    return delta


def detach_delta(module: nn.Linear, *, keep_merged: bool) -> None:
    """Remove the delta; leave the weight merged (base + values) or restore the base."""
    delta = delta_of(module)
    if delta.beside:
        if keep_merged:
            raise DeltaError("a sparse delta cannot be merged into quantized weights")
    else:
        delta.write(module.weight) if keep_merged else delta.restore(module.weight)
    del module.sparse_delta
    module.__dict__.pop("forward", None)


def sparse_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        canonical_name(n): m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and hasattr(m, "sparse_delta")
    }


def candidate_modules(
    model: nn.Module, layers: list[int], targets: list[str] | None
) -> dict[str, nn.Linear]:
    """The plain ``nn.Linear`` modules (inside PEFT wrappers too) of the given layers, by
    their name in the plain base model."""
    targets = target_module_names(model, targets, "sparse")
    all_layers = decoder_layers(model)
    inside = {id(m) for i in layers for m in all_layers[i].modules()}
    out = {}
    for name, m in model.named_modules():
        # plain or quantized (bitsandbytes' layers are nn.Linear subclasses), not peft's
        if not isinstance(m, nn.Linear) or hasattr(m, "base_layer") or id(m) not in inside:
            continue
        canon = canonical_name(name)
        if canon.rsplit(".", 1)[-1] in targets:
            out[canon] = m
    return out


def save_sparse(model: nn.Module, path: Path, meta: dict[str, str] | None = None) -> None:
    tensors, metadata = {}, dict(meta or {})
    for name, m in sparse_modules(model).items():
        d = delta_of(m)
        idx = d.indices
        rows, width = d.weight_shape
        tensors[f"{name}.indices"] = idx.to(torch.int32) if rows * width < 2**31 else idx
        tensors[f"{name}.values"] = d.values.detach().float()
        metadata[f"{name}.shape"] = f"{rows},{width}"
    write_safetensors(path, tensors, metadata)


def read_sparse(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """{module: (indices, values)} and the file's metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise DeltaError(f"{path}: unreadable sparse delta ({e})") from e
    out = {}
    for k in keys:
        if k.endswith(".indices"):
            name = k[: -len(".indices")]
            if f"{name}.values" not in tensors:
                raise DeltaError(f"{path}: {name} has indices but no values")
            out[name] = (tensors[k].long(), tensors[f"{name}.values"])
    return out, meta


def check_against(model: nn.Module, entries: dict, meta: dict, where: Path) -> dict[str, nn.Linear]:
    """Refuse a delta whose modules, shapes or indices do not fit ``model``."""
    modules = linear_modules(model)
    found = {}
    for name, (idx, values) in entries.items():
        if name not in modules:
            raise DeltaError(f"{where}: module {name!r} is not in the model")
        m = modules[name]
        shape, (rows, width) = meta.get(f"{name}.shape"), weight_shape(m)
        if shape is not None and tuple(int(s) for s in shape.split(",")) != (rows, width):
            raise DeltaError(
                f"{where}: {name} was trained on a weight of shape ({shape}), the "
                f"model's is {(rows, width)}"
            )
        if idx.numel() != values.numel():
            raise DeltaError(
                f"{where}: {name} has {idx.numel()} indices but {values.numel()} values"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows * width):
            raise DeltaError(
                f"{where}: {name} has indices outside its weight (0..{rows * width - 1})"
            )
        if torch.unique(idx).numel() != idx.numel():
            raise DeltaError(f"{where}: {name} repeats an index")
        found[name] = m
    return found


STRUCTURE_HELP = (
    "entries (any weight entry) or columns (whole input columns: the backward and the "
    "saved activations shrink with the density)"
)


def check_regrow_base(model: nn.Module, regrow_every: int) -> None:
    """Drop-and-regrow moves entries of the base weights and grows from their dense
    gradient: neither exists beside a quantized weight (the regrow would silently never
    happen), so it is refused there."""
    if regrow_every and quantization_of(model) != "none":
        raise UserInputError(
            "drop-and-regrow (--regrow-every) is not supported on a quantized base "
            "(it moves entries of the weights); drop --quantize or --regrow-every"
        )


def check_structure(structure: str, regrow_every: int) -> None:
    """The ``structure`` option, for sparse and RoSA alike."""
    if structure not in STRUCTURES:
        raise UserInputError(f"structure must be entries or columns, got {structure!r}")
    if structure == "columns" and regrow_every > 0:
        raise UserInputError(
            "drop-and-regrow works on entries only: structure=columns never computes the "
            "dense gradient it grows from; add --structure entries (or -o structure=entries) "
            "to regrow"
        )


@dataclass
class SparseOptions(MethodConfig):
    density: float = option(0.01, help="share of each weight to train", sweep=True)
    importance: str = option("fisher", help="importance scorer: fisher, grad, activation or random")
    selection: str = option("per_tensor", help="per_tensor or global")
    # None resolves to columns (on the bundled task as good or better than entries and, on a
    # GPU, faster than LoRA: BENCHMARKS.md, "Sparse by columns"), or to entries where
    # drop-and-regrow is on, which needs them
    structure: str | None = option(
        None, help=STRUCTURE_HELP, shown_default="columns or, with --regrow-every, entries"
    )
    # short names; None = every linear in the blocks
    target_modules: list[str] | None = option(
        None,
        flag="lora-targets",
        help="linear modules to adapt, comma-separated short names; default: every "
        "linear layer in the blocks",
    )
    calibration_batches: int = 8
    regrow_every: int = option(0, help="drop-and-regrow every N steps; 0: off")
    regrow_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise UserInputError(f"density must be in (0, 1), got {self.density}")
        if self.importance not in SCORERS:
            raise UserInputError(
                f"importance must be one of {', '.join(SCORERS)}, got {self.importance!r}"
            )
        if self.selection not in SELECTIONS:
            raise UserInputError(f"selection must be per_tensor or global, got {self.selection!r}")
        if self.regrow_every < 0 or not 0.0 < self.regrow_fraction < 1.0:
            raise UserInputError("regrow_every must be >= 0 and regrow_fraction in (0, 1)")
        if self.structure is None:
            self.structure = "entries" if self.regrow_every > 0 else "columns"
        check_structure(self.structure, self.regrow_every)


@register_method
class SparseMethod(Method):
    name = "sparse"
    config_class = SparseOptions
    config: SparseOptions
    default_lr = 1e-3  # benchmarks/lr_sweep.py (BENCHMARKS.md), on SmolLM2-135M
    lr_weight_exponent = 1.0  # trains base entries (training/lr_scale.py)
    delta_files = (SPARSE_FILE,)

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        if not layers:
            raise UserInputError("sparse: no layer left to train (everything is frozen)")
        check_regrow_base(model, self.config.regrow_every)
        model.requires_grad_(False)
        self.attach_selected(model, layers, batches)
        return model

    def attach_selected(self, model: nn.Module, layers: list[int], batches) -> dict[str, int]:
        return self.attach_chosen(model, self.choose(model, layers, batches))

    def choose(self, model: nn.Module, layers: list[int], batches) -> dict[str, torch.Tensor]:
        """Score the candidate weights of ``layers`` and pick the top entries of each."""
        cfg = self.config
        modules = candidate_modules(model, layers, cfg.target_modules)
        data = (lambda: batches(cfg.calibration_batches)) if batches is not None else None
        scores = importance_scores(
            model,
            modules,
            cfg.importance,
            data,
            seed=cfg.seed,
            progress=data is not None and self.progress,
        )
        return select_top(scores, cfg.density, cfg.selection, cfg.structure or "columns")

    def attach_chosen(self, model: nn.Module, chosen: dict[str, torch.Tensor]) -> dict[str, int]:
        modules = linear_modules(model)
        for name, idx in chosen.items():
            attach(modules[name], idx)
        self.selected = {n: int(i.numel()) for n, i in chosen.items()}
        return self.selected

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Indices and base entries move with drop-and-regrow: checkpoints keep them (not
        ``cols``, which :meth:`load_state_dict` derives from the loaded indices)."""
        return {
            f"{n}.{k}": getattr(m, k).detach()
            for n, m in model.named_modules()
            if isinstance(m, SparseDelta)
            for k in ("indices", "base_values")
        }

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """A regrow armed at the last step (its candidates come from the next backward):
        without it a resumed run would skip that regrow."""
        pending = {}
        for name, m in sparse_modules(model).items():
            d = delta_of(m)
            if d.regrow_candidates is not None:  # on_step_end consumes them in the same step
                raise RuntimeError(f"{name}: regrow candidates pending at a checkpoint")
            if d.regrow_count:
                pending[name] = d.regrow_count
        return {"regrow_pending": pending}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        modules = sparse_modules(model)
        for m in modules.values():  # the checkpoint's indices were copied in
            delta_of(m).find_layout()
        for name, count in (state.get("regrow_pending") or {}).items():
            delta_of(modules[name]).regrow_count = int(count)

    def on_step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Drop-and-regrow every ``regrow_every`` steps (the density stays fixed). Not
        after the run's last step but one: the regrow would come after the last optimizer
        step, and its new entries would be saved untrained (zero)."""
        cfg: SparseOptions = self.config
        if not cfg.regrow_every:
            return
        modules = sparse_modules(model).values()
        for m in modules:
            if delta_of(m).regrow_candidates is not None:
                regrow(delta_of(m), m.weight, optimizer)
        steps = self.run_steps
        last = steps is not None and step + 2 >= steps  # the next step is the run's last
        if (step + 1) % cfg.regrow_every == 0 and not last:  # next backward records candidates
            for m in modules:
                d = delta_of(m)
                d.regrow_count = max(1, round(cfg.regrow_fraction * d.indices.numel()))

    def save(self, model: nn.Module, folder: Path) -> None:
        save_sparse(model, folder / SPARSE_FILE, {"importance": self.config.importance})

    @classmethod
    def attach(
        cls, model: nn.Module, folder: Path, manifest: dict[str, Any], *, merge: bool
    ) -> Attachment:
        """Scatter-add the values into the weights (always merged); undo puts the original
        entries back. On a quantized base the delta runs beside the weights instead, never
        merged (apply_delta refuses a merge there before calling this)."""
        if quantization_of(model) != "none":
            return attach_beside(model, folder / SPARSE_FILE)
        undo = apply_sparse(model, folder / SPARSE_FILE)
        return Attachment(model, True, lambda: remove_sparse(model, undo))


def regrow(delta: SparseDelta, weight: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    new = delta.regrow_candidates
    assert new is not None  # on_step_end calls this only where candidates are pending
    delta.regrow_candidates = None
    n = new.numel()
    drop = torch.topk(delta.values.detach().abs(), n, largest=False).indices
    with torch.no_grad():
        weight.view(-1).index_copy_(0, delta.indices[drop], delta.base_values[drop])
        delta.indices[drop] = new
        delta.base_values[drop] = weight.view(-1)[new]
        delta.values[drop] = 0.0
    delta.find_layout()
    state = optimizer.state.get(delta.values, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][drop] = 0.0


def apply_sparse(model: nn.Module, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scatter-add a sparse delta file into ``model``'s weights; return what undoes it."""
    entries, meta = read_sparse(path)
    modules = check_against(model, entries, meta, path)
    undo = {}
    with torch.no_grad():
        for name, (idx, values) in entries.items():
            w = modules[name].weight
            idx = idx.to(w.device)
            base = w.view(-1)[idx].clone()
            w.view(-1).index_copy_(0, idx, (base.float() + values.to(w.device)).to(w.dtype))
            undo[name] = (idx, base)
    registry = model.__dict__.setdefault("_slimtune_sparse_undo", [])
    registry.append(undo)
    return undo


def attach_beside(model: nn.Module, path: Path) -> Attachment:
    """A sparse delta file on a quantized ``model``, each module's delta running beside its
    weight (unmerged); undo takes them off (the quantized weights were never written)."""
    entries, meta = read_sparse(path)
    modules = check_against(model, entries, meta, path)
    for name, (idx, values) in entries.items():
        attach(modules[name], idx, values).requires_grad_(False)

    def undo() -> None:
        for name in entries:
            detach_delta(modules[name], keep_merged=False)

    return Attachment(model, False, undo)


def remove_sparse(model: nn.Module, undo: dict | None = None) -> None:
    """Undo ``undo`` (what :func:`apply_sparse` returned; default: the last one applied to
    ``model``): the base weights, bit for bit."""
    registry = model.__dict__.get("_slimtune_sparse_undo") or []
    if not registry or (undo is not None and not any(u is undo for u in registry)):
        raise DeltaError("no sparse delta is applied to this model")
    if undo is None:
        undo = registry.pop()
    else:
        registry[:] = [u for u in registry if u is not undo]
    modules = linear_modules(model)
    with torch.no_grad():
        for name, (idx, base) in undo.items():
            modules[name].weight.view(-1).index_copy_(0, idx, base)
