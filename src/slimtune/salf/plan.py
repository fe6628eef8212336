"""Cost estimates per method and end-of-freezing layer, and choices under a budget.

Nothing here is a constant tuned to one model. For a method, a *calibration* builds small
copies of the model's own architecture (same config, 2-5 decoder layers, random weights),
runs a few real training steps on them with the planned batch shape, on this machine, and
measures step time and peak memory for a few (frozen layers, trained layers) mixes (on a
GPU the step times on copies up to as wide as the model, :func:`gpu_mix_scale`). Both
are linear in the number of frozen and trained layers:

    T(k) = a + k * t_frozen + (L - k) * t_trained        (seconds per optimizer step)

fitted by least squares over four (frozen, trained) mixes; ``t_frozen`` is a frozen
layer's forward, ``t_trained`` a trained layer's forward + backward + optimizer, ``a`` the
embeddings, head, loss and fixed overheads. It is fitted twice, on two batches of the
user's data timed in turn on the same mini models: the *worst case* (the ``batch_size``
longest examples, :func:`calibration_batch`) and the *typical* batch (a random batch of the
median padded width, :func:`typical_batch`). The trainer pads each random batch to its
longest example, so a run's median step is the typical batch's step: time budgets and the
step time shown use it, while memory must fit the worst case. Memory above what is
resident is

    M(k) = state(n) + max(activations(n), 2 * gradients(n)) + transient,   n = L - k

where state and gradients come from the exact trainable bytes of one layer, activations
from the bytes autograd saves for one trained layer (counted with saved-tensor hooks on
the mini models), and the transient (loss chunk, backward workspace, allocator slack)
from one measured peak. With ``k = 0`` a full fine-tune also trains the embeddings (tied
to the head), which is measured separately. The estimate for the real model adds the
memory resident before training (weights, runtime).

The budget policy unfreezes from the deepest layer towards the shallow ones while the
estimate stays within the budget.

A *quantized base* (``nf4``, ``int8``: the decoder blocks' linear weights stored by
bitsandbytes) is costed the same way: the mini models get their block linears quantized
as ``--quantize`` does it, so the measured activations, transients and step times are those
of the quantized layers. The real model's resident memory is measured once as loaded and
converted between quantizations from parameter counts (:func:`resident_bytes`): the block
linears at :data:`BYTES_PER_WEIGHT`, the rest at its dtype. A model loaded quantized is
thus measured as it is, and its unquantized estimate adds back what quantizing saved.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import psutil
import torch
from torch import nn

from ..errors import UserInputError
from ..eval.cost import PeakMemory, format_bytes
from ..methods import get_method, method_class
from ..model.anatomy import base_model, decoder_layers
from ..model.quantize import BYTES_PER_WEIGHT, is_quantized, quantization_of, quantize_model
from ..training.step import adamw, fused_adamw_fits, steady_gc
from .freezing import freeze_below


@dataclass
class StepTimes:
    """Seconds per optimizer step of one batch shape: fixed + per frozen layer + per
    trained layer (+ the embeddings when a full fine-tune trains them, at k = 0)."""

    fixed: float
    frozen: float
    trained: float
    embeddings: float = 0.0

    def at(self, num_layers: int, k: int, embeddings: bool) -> float:
        n = num_layers - k
        t = self.fixed + k * self.frozen + n * self.trained
        return max(t + (self.embeddings if embeddings else 0.0), 0.0)


@dataclass
class LayerCosts:
    """Measured cost model of one method at one batch shape on this machine."""

    method: str
    options: dict
    num_layers: int
    # seconds per step: fixed + per frozen layer + per trained layer (+ embeddings at k = 0)
    t_fixed: float
    t_frozen: float
    t_trained: float
    t_embeddings: float
    # bytes: per trained layer, exact from parameter counts and saved-tensor hooks
    state_bytes_per_layer: int  # optimizer state (AdamW: 2 x trainable)
    grad_bytes_per_layer: int
    activation_bytes_per_layer: int
    embedding_train_bytes: int  # grads + state of the embeddings when k = 0 (full)
    transient_bytes: int  # fitted from a measured peak: loss chunk, workspaces, allocator slack
    resident_bytes: int  # memory in use before training (weights + runtime)
    trainable_per_layer: int
    trainable_embeddings: int
    flops_forward_per_layer: float
    flops_backward_per_trained_layer: float
    quantize: str = "none"  # how the base's block linears are stored (none, nf4, int8)
    # the base's weights as stored, all and one decoder layer's: what FSDP2 shards
    weight_bytes: int = 0
    layer_weight_bytes: int = 0
    # step times of the typical batch (the t_* above are the worst case's); None: the same
    typical: StepTimes | None = None
    # the step times were fitted on mixes of this many times the narrow ones' layers
    timing_scale: int = 1
    # the optimizer step runs torch's fused AdamW (training/step.py, adamw), which makes no
    # temporary copy of the optimizer state; the multi-tensor one (CPU, FSDP2) makes one
    fused_optimizer: bool = False

    def times(self, which: str = "typical") -> StepTimes:
        """The step-time model of the ``typical`` or the ``worst`` batch."""
        worst = StepTimes(self.t_fixed, self.t_frozen, self.t_trained, self.t_embeddings)
        return self.typical if which == "typical" and self.typical is not None else worst

    def scale_times(self, factor: float) -> None:
        """Multiply every step time by ``factor`` (e.g. micro-batches per optimizer step)."""
        self.t_fixed *= factor
        self.t_frozen *= factor
        self.t_trained *= factor
        self.t_embeddings *= factor
        if self.typical is not None:
            t = self.typical
            self.typical = StepTimes(*(factor * v for v in asdict(t).values()))


@dataclass
class Estimate:
    method: str
    options: dict
    freeze_below: int
    trainable_params: int
    step_time_s: float  # the typical step (median padded width): what time budgets use
    peak_bytes: int  # the worst case (the longest examples)
    backward_flops: float
    predicted_gain: float | None = None
    fits: bool = True
    notes: list[str] = field(default_factory=list)
    quantize: str = "none"
    devices: int = 1  # processes, one device each; peak_bytes is per device
    fsdp: bool = False
    worst_step_time_s: float | None = None  # the step of the longest examples
    # the typical step once the frozen layers' output is kept per example (train's
    # --cache-frozen, by default in one process over data seen twice or more, from an
    # example's second sight); None: nothing frozen, or several processes
    cached_step_time_s: float | None = None
    prior: float | None = None  # measured score relative to LoRA r8's (evidence.py)
    expected_quality: float | None = None  # prior x predicted_gain
    lr: float | None = None  # the learning rate the evidence measured the method at
    evidence: str | None = None  # the measurements behind the prior

    def to_dict(self) -> dict:
        return asdict(self)


def _trim_heap() -> None:
    """Give freed heap back to the OS so the next RSS peak measures only what follows."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident(device: torch.device, model: nn.Module | None = None) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if model is not None:
        # weights loaded from safetensors are memory-mapped and count towards RSS only once
        # touched; training touches them all, so the estimate must start from there
        with torch.no_grad():
            for p in model.parameters():
                p.detach().view(-1)[:: max(1, 4096 // p.element_size())].sum()
    _trim_heap()
    return int(psutil.Process().memory_info().rss)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (a quantized model's packed weights are uint8)."""
    return base_model(model).get_input_embeddings().weight.dtype


def _mini_model(
    model: nn.Module, layers: int, device: torch.device, quantize: str | None = None
) -> nn.Module:
    """A random copy of ``model``'s architecture with ``layers`` decoder layers, its block
    linears stored as ``quantize`` (default: as ``model``'s are)."""
    from transformers import AutoModelForCausalLM

    quantize = quantization_of(model) if quantize is None else quantize
    cfg = copy.deepcopy(base_model(model).config)
    cfg.num_hidden_layers = layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:layers]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast
        mini = AutoModelForCausalLM.from_config(cfg, dtype=_float_dtype(model))
    if quantize != "none":  # as load_model(quantize=...) does: from the CPU, layer by layer
        quantize_model(mini.to("cpu"), quantize, device)
        mini.to(device)
    return mini


def _weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights of the decoder blocks' linear layers, bytes of every other parameter): what
    ``--quantize`` stores quantized, counted dense, and what it leaves at the model's dtype."""
    block, ids = 0, set()
    for layer in decoder_layers(model):
        for m in layer.modules():
            if type(m) is nn.Linear or is_quantized(m):
                block += int(m.in_features) * int(m.out_features)
                ids.add(id(m.weight))
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in ids)
    return block, rest


def _root_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights outside the decoder layers (embeddings, final norm, head)."""
    inside = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)


def _layer_weight_bytes(model: nn.Module, quantize: str) -> int:
    """Bytes of one decoder layer's weights stored as ``quantize`` (the mean over layers)."""
    n = max(len(decoder_layers(model)), 1)
    return weight_bytes(model, quantize) // n - _root_weight_bytes(model) // n


def weight_bytes(model: nn.Module, quantize: str = "none") -> int:
    """Bytes of ``model``'s weights with its block linears stored as ``quantize``, from
    parameter counts (:data:`BYTES_PER_WEIGHT`; the rest, and ``none``, at the model's dtype)."""
    block, rest = _weight_counts(model)
    per_weight = BYTES_PER_WEIGHT.get(quantize) or _float_dtype(model).itemsize
    return int(block * per_weight) + rest


def _measure_resident(device: torch.device, model: nn.Module, quantizations: list[str]) -> int:
    """What is resident with ``model`` loaded, the quantization backend's code included when
    a quantized base is costed (on the CPU, bitsandbytes' libraries add to the RSS of such a
    run whether or not the loaded model uses them yet)."""
    if any(q != "none" for q in quantizations):
        import bitsandbytes  # noqa: F401
    return _resident(device, model)


def resident_bytes(model: nn.Module, quantize: str, measured: int) -> int:
    """Memory resident before training with the base stored as ``quantize``, from what is
    ``measured`` with the model as loaded: the same when it is loaded that way, else that
    minus its weights as stored plus its weights as ``quantize`` stores them."""
    loaded_as = quantization_of(model)
    if quantize == loaded_as:
        return measured
    return measured - weight_bytes(model, loaded_as) + weight_bytes(model, quantize)


def takes_quantization(method: str, quantize: str) -> bool:
    """Whether ``method`` trains on a base stored as ``quantize`` (full fine-tuning does not)."""
    return quantize == "none" or quantize in method_class(method).quantizations


def _costing_method(method: str, options: dict | None):
    """The method as costed: a training step does not depend on *which* entries an
    importance scorer picks, so mini models select at random (no calibration data needed)."""
    m = get_method(method, dict(options or {}))
    if hasattr(m.config, "importance"):
        m = get_method(method, {**dict(options or {}), "importance": "random"})
    return m


def _trained_layer_params(
    model: nn.Module,
    method: str,
    options: dict | None,
    device: torch.device,
    quantize: str | None = None,
) -> list[nn.Parameter]:
    """The parameters ``method`` trains inside one decoder layer (not the embeddings or the
    final norm, which a method training *every* layer may also take)."""
    mini = _mini_model(model, 2, device, quantize)
    probe = _costing_method(method, options).prepare(mini, [1])
    return [p for p in decoder_layers(probe)[1].parameters() if p.requires_grad]


def _flops_per_token_layer(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer: matmuls + attention scores."""
    layer = decoder_layers(model)[0]
    # in x out, not weight.numel(): a quantized weight is packed
    linear = sum(
        m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear)
    )
    cfg = base_model(model).config
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2.0 * linear + 4.0 * seq_len * heads * head_dim / 2  # causal: half the scores


class _SavedBytes:
    """Bytes autograd saves for backward during a forward pass (each storage counted once),
    leaving out ``model``'s own parameters and buffers: a frozen weight saved for the input
    gradient (a 4-bit one packed) is resident already, not an activation."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.seen: dict[int, int] = {}
        tensors = [] if model is None else [*model.parameters(), *model.buffers()]
        self.resident = {t.untyped_storage().data_ptr() for t in tensors}

    def pack(self, t: torch.Tensor):
        with contextlib.suppress(RuntimeError, NotImplementedError):
            st = t.untyped_storage()
            if st.data_ptr() not in self.resident:
                self.seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _measure(
    mini: nn.Module,
    method: str,
    options: dict,
    n_frozen: int,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    autocast,
    steps: int,
    train_embeddings: bool = False,
    typical: dict[str, torch.Tensor] | None = None,
) -> tuple[float, int, int, float]:
    """(step time, peak memory above what was resident, bytes saved for backward, step
    time of ``typical``). With ``typical`` the two batches are timed in turn after one
    warm-up step each, so a change of load on the machine hits both alike. On a CPU a step
    time is the shortest of the ``steps`` timed: a burst of other work on the machine during
    one calibration would otherwise skew that method against the others (issue 18 saw LoRA
    r=8 costed 16% above r=16, which it never is); on a GPU the median (:func:`_step_time`)."""
    from ..model.kernels import apply_fused_kernels
    from ..training.step import accumulate_gradients

    before = _resident(device)
    n = len(decoder_layers(mini))
    m = _costing_method(method, options)
    apply_fused_kernels(mini, device)  # cost what `slimtune train` runs: the same kernels
    model = m.prepare(mini, list(range(n_frozen, n)))
    freeze_below(model, n_frozen)
    if train_embeddings:
        base_model(model).get_input_embeddings().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, 1e-6)
    model.train()
    batches = [batch] if typical is None else [batch, typical]
    times: list[list[float]] = [[] for _ in batches]
    saved = _SavedBytes(model)
    if device.type != "cuda":
        _trim_heap()
    # and, on a GPU (bf16 autocast), the method's own compute path (e.g. fused LoRA)
    compute = m.compute_context(model) if device.type == "cuda" else contextlib.nullcontext()
    with PeakMemory(device) as mem, compute:
        for i in range(steps + 1):
            for j, b in enumerate(batches):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                hooks = (
                    torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
                    if i == j == 0
                    else contextlib.nullcontext()
                )
                with hooks:
                    accumulate_gradients(model, params, [b], device, autocast, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:
                    times[j].append(time.perf_counter() - t0)
    peak = mem.peak_bytes - before
    del model, opt, params
    return _step_time(times[0], device), peak, saved.total, _step_time(times[-1], device)


def timed_steps(device: torch.device) -> int:
    """Steps timed per calibration mix: the fastest of 3 on a CPU, the median of 9 on a
    GPU (:func:`_step_time`); mini models' steps are short, so 9 cost a second or two."""
    return 9 if device.type == "cuda" else 3


def _again(device: torch.device):
    """How a mix timed again (a disturbed fit) keeps ``kept``, from ``n`` readings, and a
    new one: on a CPU the faster (the other was slowed by other work); on a GPU, where each
    is a median already, the mean of all its readings (the smaller of two medians would
    bring back the bias the median removes)."""
    if device.type != "cuda":
        return lambda kept, new, n: min(kept, new)
    return lambda kept, new, n: (kept * n + new) / (n + 1)


def _step_time(times: list[float], device: torch.device) -> float:
    """The step time a run will see, from a mix's timed steps. On a CPU the step is
    compute-bound and the shortest is the undisturbed one (other work on a shared machine
    only slows steps). On a GPU a small model's step is host-bound and its host time varies
    by 25-35% from step to step on a quiet machine (``benchmarks/train_step_phases.py``: a
    median forward and backward of 95 ms against a fastest of 70-75 ms on an H200): the
    fastest of a few steps costed a run's median step 16-26% short, so the median is kept."""
    return statistics.median(times) if device.type == "cuda" else min(times)


def gpu_mix_scale(
    num_layers: int, peak_at: Callable[[int, int], int], layer_bytes: int, free_bytes: int
) -> int:
    """How many times the calibration mixes' layers a GPU times its step times on: the
    largest ``s`` (at most ``num_layers // 5``: the widest mix, ``(s, 4s)``, then has no
    more layers than the model) whose widest mixes' weights and measured-and-extrapolated
    peak ``peak_at(frozen, trained)`` take at most half of ``free_bytes``.

    A small model's GPU step is host work whose time varies by a quarter from step to step;
    fitted on mixes of 2-5 layers and extrapolated to 30, that noise in a layer's slope was
    multiplied about sixfold (plan's GPU estimates of one configuration moved by 50% from
    run to run, BENCHMARKS.md "plan: estimates against measurement"). Timed on mixes as
    wide as the model, the estimate interpolates."""
    best = 1
    for s in range(2, num_layers // 5 + 1):
        need = max(5 * s * layer_bytes + peak_at(f * s, t * s) for f, t in ((1, 4), (4, 1)))
        if need > free_bytes // 2:
            break
        best = s
    return best


def _auto_timing_scale(
    model: nn.Module, device: torch.device, quantize: str, num_layers: int, points: dict
) -> int:
    """:func:`gpu_mix_scale` on a GPU from the peaks of the mixes measured at scale 1 (linear
    in frozen and trained layers; a full fine-tune's embedding state counted in every mix).
    1 on a CPU, whose compute-bound step the small mixes already time within a few percent,
    and for a quantized base, whose mini models are built dense on the GPU before they are
    quantized (on the CPU, layer by layer: slow for a whole model)."""
    if device.type != "cuda" or quantize != "none":
        return 1
    p11, p14, p41 = (points[(f, t, False)][1] for f, t in ((1, 1), (1, 4), (4, 1)))
    per_trained, per_frozen = max((p14 - p11) // 3, 0), max((p41 - p11) // 3, 0)
    emb = points.get((0, 2, True))
    emb_extra = max(emb[1] - (p11 - per_frozen + per_trained), 0) if emb else 0

    def peak_at(f: int, t: int) -> int:
        return p11 + (f - 1) * per_frozen + (t - 1) * per_trained + emb_extra

    free = torch.cuda.mem_get_info(device)[0] - _root_weight_bytes(model)
    return gpu_mix_scale(num_layers, peak_at, _layer_weight_bytes(model, quantize), free)


def _least_squares(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Fit y = a + b * n_frozen + c * n_trained; per-layer costs clamped at >= 0."""
    import numpy as np

    A = np.array([[1.0, f, t] for f, t, _ in points])
    y = np.array([v for _, _, v in points])
    a, b, c = np.linalg.lstsq(A, y, rcond=None)[0]
    b, c = max(float(b), 0.0), max(float(c), 0.0)
    a = float(np.mean(y - b * A[:, 1] - c * A[:, 2]))
    return a, b, c


#: Mixes whose times a linear fit misses by more than this (relative) were not all timed
#: alike: other work on the machine slowed some of them (a layer costs the same in every
#: mix; a quiet machine's jitter of a few percent leaves residuals under 2.5%).
DISTURBED = 0.05


def disturbed(times: dict[tuple[int, int], float]) -> bool:
    """Whether other work on the machine slowed some of the (frozen, trained) mixes' times.

    Four mixes leave one degree of freedom: which mix was slowed cannot be told, only that
    the fit misses one by more than :data:`DISTURBED`, or that it gives a trained layer no
    cost at all. A burst during the first, high-leverage mix tilts it that far: the first
    CPU run on support-extract costed full fine-tuning at 0.61 s a step, 2.79 s measured.
    """
    import numpy as np

    if len(times) < 4:
        return False
    A = np.array([[1.0, f, t] for f, t in times])
    y = np.array(list(times.values()))
    x = np.linalg.lstsq(A, y, rcond=None)[0]
    return bool(x[2] <= 0 or np.max(np.abs(y - A @ x) / y) > DISTURBED)


@steady_gc()  # its collections (one per mini model) walk only what calibration made
def calibrate(
    model: nn.Module,
    method: str,
    options: dict | None,
    batch: dict[str, torch.Tensor],
    *,
    autocast=contextlib.nullcontext,
    steps: int | None = None,
    quantize: str | None = None,
    measured_resident: int | None = None,
    typical_batch: dict[str, torch.Tensor] | None = None,
    timing_scale: int | None = None,
) -> LayerCosts:
    """Measure the cost model of ``method`` for this model's architecture and ``batch``, on
    a base stored as ``quantize`` (default: as ``model`` is loaded). ``measured_resident``:
    the model's resident memory as loaded, when the caller measured it once for several
    calibrations (so that their estimates differ only by what they cost).
    ``typical_batch``: a batch of the run's typical width, timed beside ``batch`` (the
    worst case, which alone sets memory) so that step times are estimated for both.
    ``steps``: timed steps per mix (default :func:`timed_steps`). ``timing_scale``: the
    step times come from mixes of this many times the layers (default: on a GPU as wide as
    its memory holds, up to the model's own, :func:`gpu_mix_scale`; 1 on a CPU). On a GPU
    the wide mixes add up to a whole model's steps per mix to the calibration's time."""
    options = dict(options or {})
    quantize = quantization_of(model) if quantize is None else quantize
    if not takes_quantization(method, quantize):
        raise UserInputError(f"{method} cannot train on a quantized base ({quantize})")
    device = next(model.parameters()).device
    steps = timed_steps(device) if steps is None else steps
    L = len(decoder_layers(model))
    if measured_resident is None:
        measured_resident = _measure_resident(device, model, [quantize])
    resident = resident_bytes(model, quantize, measured_resident)
    # wide spreads of frozen / trained layer counts keep timing noise small against the slopes
    mixes = [(1, 1, False), (1, 4, False), (4, 1, False), (2, 2, False)]
    declared = method_class(method)
    if declared.trains_embeddings:
        mixes.append((0, 2, True))

    def measure(n_frozen: int, n_trained: int, emb: bool) -> tuple[float, int, int, float]:
        mini = _mini_model(model, n_frozen + n_trained, device, quantize)
        m = _measure(
            mini, method, options, n_frozen, batch, device, autocast, steps, emb, typical_batch
        )
        del mini
        _trim_heap()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return m

    points = {mix: measure(*mix) for mix in mixes}  # memory, and the times at scale 1
    if timing_scale is None:
        timing_scale = _auto_timing_scale(model, device, quantize, L, points)
    if timing_scale < 1:
        raise ValueError(f"timing_scale must be at least 1, not {timing_scale}")
    timed = points
    if timing_scale > 1:
        s = timing_scale
        timed = {(f * s, t * s, e): measure(f * s, t * s, e) for f, t, e in mixes}
    keep = _again(device)
    for again in range(2):  # at most twice: every mix again (see _again for what is kept)
        if not any(
            disturbed({(f, t): v[i] for (f, t, e), v in timed.items() if not e}) for i in (0, 3)
        ):
            break
        for mix in timed:
            old, new = timed[mix], measure(*mix)
            n = again + 1  # readings kept so far: every mix is timed again in each round
            timed[mix] = (keep(old[0], new[0], n), old[1], old[2], keep(old[3], new[3], n))

    def fit(i: int) -> StepTimes:
        """The step-time model of the batch whose times are at ``i`` in each point."""
        a, b, c = _least_squares([(f, t, v[i]) for (f, t, e), v in timed.items() if not e])
        emb = [(t, v) for (f, t, e), v in timed.items() if e]
        return StepTimes(a, b, c, max(emb[0][1][i] - (a + emb[0][0] * c), 0.0) if emb else 0.0)

    worst = fit(0)
    t_fixed, t_fr, t_tr, t_emb = worst.fixed, worst.frozen, worst.trained, worst.embeddings

    layer_params = _trained_layer_params(model, method, options, device, quantize)
    trainable_layer = sum(p.numel() for p in layer_params)
    trainable_layer_bytes = sum(p.numel() * p.element_size() for p in layer_params)
    fused = fused_adamw_fits(layer_params)  # as adamw() decides for the real run's
    del layer_params
    emb_weight = base_model(model).get_input_embeddings().weight
    emb_bytes = emb_weight.numel() * emb_weight.element_size() if declared.trains_embeddings else 0
    act = max((points[(1, 4, False)][2] - points[(1, 1, False)][2]) // 3, 0)
    costs = LayerCosts(
        method=method,
        options=options,
        num_layers=L,
        t_fixed=t_fixed,
        t_frozen=t_fr,
        t_trained=t_tr,
        t_embeddings=t_emb,
        state_bytes_per_layer=2 * trainable_layer_bytes,
        grad_bytes_per_layer=trainable_layer_bytes,
        activation_bytes_per_layer=act,
        embedding_train_bytes=3 * emb_bytes,
        transient_bytes=0,
        resident_bytes=resident,
        trainable_per_layer=trainable_layer,
        trainable_embeddings=emb_weight.numel() if declared.trains_embeddings else 0,
        flops_forward_per_layer=_flops_per_token_layer(model, batch["input_ids"].shape[1])
        * batch["input_ids"].numel(),
        flops_backward_per_trained_layer=0.0,
        quantize=quantize,
        weight_bytes=weight_bytes(model, quantize),
        layer_weight_bytes=_layer_weight_bytes(model, quantize),
        typical=fit(3) if typical_batch is not None else None,
        timing_scale=timing_scale,
        fused_optimizer=fused,
    )
    costs.flops_backward_per_trained_layer = (
        2.0 if declared.weight_grads else 1.0
    ) * costs.flops_forward_per_layer
    # what the per-layer accounting does not explain in the measured 1 frozen + 1 trained
    # mix is the fixed transient (loss chunk, backward workspace, LoRA weights, slack)
    costs.transient_bytes = max(points[(1, 1, False)][1] - _extra_bytes(costs, 1), 0)
    return costs


def _extra_bytes(costs: LayerCosts, trained: int, embeddings: bool = False, shards: int = 1) -> int:
    """Bytes training adds for ``trained`` layers, before the fixed transient.

    Peak is reached either at the start of backward (all saved activations alive) or in the
    optimizer step (all gradients alive, plus the multi-tensor AdamW's temporaries of the
    same size; the fused one, unsharded on CUDA, updates in place). FSDP2's sharded
    parameters take the multi-tensor path.
    """
    states = trained * costs.state_bytes_per_layer
    grads = trained * costs.grad_bytes_per_layer
    acts = trained * costs.activation_bytes_per_layer
    if embeddings:
        states += 2 * costs.embedding_train_bytes // 3
        grads += costs.embedding_train_bytes // 3
    in_step = grads if costs.fused_optimizer and shards == 1 else 2 * grads
    return (states + max(acts * shards, in_step)) // shards  # states, grads: sharded


def estimate(costs: LayerCosts, k: int, *, devices: int = 1, fsdp: bool = False) -> Estimate:
    """Step time, peak memory, trainable parameters and backward FLOPs at ``freeze_below=k``.

    With ``devices`` processes (one device each, the batch per device) the peak is per
    device. Under DDP it is one device's (its gradients are views into DDP's buckets, no
    second copy). Under FSDP2 the weights, gradients and optimizer state are divided by
    ``devices``, plus what is gathered whole: two decoder layers (the one running and the
    next, prefetched) and the root's weights (embeddings, final norm, head), held from
    forward to backward; evaluation and writing the delta gather all the weights at once
    (beside the sharded optimizer state), so the peak is at least that. The step time is
    one device's, of the typical batch (``worst_step_time_s``: of the longest examples);
    communication is not modelled."""
    L = costs.num_layers
    if not 0 <= k < L:
        raise UserInputError(f"freeze_below must be in [0, {L - 1}], got {k}")
    n = L - k
    emb = k == 0 and costs.trainable_embeddings > 0
    worst = costs.times("worst").at(L, k, emb)
    t = min(costs.times("typical").at(L, k, emb), worst)  # a narrower batch is not slower
    shards = devices if fsdp and devices > 1 else 1
    resident = costs.resident_bytes
    if shards > 1:
        root = costs.weight_bytes - L * costs.layer_weight_bytes
        gathered = 2 * costs.layer_weight_bytes + root
        resident += costs.weight_bytes // shards + gathered - costs.weight_bytes
    peak = resident + costs.transient_bytes + _extra_bytes(costs, n, emb, shards)
    if shards > 1:  # evaluation and writes gather the whole weights (beside the state)
        states = n * costs.state_bytes_per_layer + (
            2 * costs.embedding_train_bytes // 3 if emb else 0
        )
        peak = max(peak, costs.resident_bytes + states // shards)
    trainable = n * costs.trainable_per_layer + (costs.trainable_embeddings if emb else 0)
    # a served step skips the frozen layers' forward, what t_frozen measures per layer;
    # train caches by default in one process only (trainer._frozen_cache)
    cached = None
    if k and devices == 1:
        skip = [replace(costs.times(w), frozen=0.0).at(L, k, emb) for w in ("typical", "worst")]
        cached = min(skip)
    return Estimate(
        costs.method,
        costs.options,
        k,
        trainable,
        t,
        int(peak),
        n * costs.flops_backward_per_trained_layer,
        quantize=costs.quantize,
        devices=devices,
        fsdp=shards > 1,
        worst_step_time_s=worst,
        cached_step_time_s=cached,
    )


def budget_freeze_below(
    costs: LayerCosts,
    *,
    memory: int | None = None,
    step_time: float | None = None,
    devices: int = 1,
    fsdp: bool = False,
) -> int | None:
    """Unfreeze from the deepest layer towards the shallow ones while within the budget.

    Returns the smallest ``freeze_below`` that fits, or ``None`` if not even the top layer does.
    """
    chosen = None
    for k in range(costs.num_layers - 1, -1, -1):
        e = estimate(costs, k, devices=devices, fsdp=fsdp)
        if (memory is not None and e.peak_bytes > memory) or (
            step_time is not None and e.step_time_s > step_time
        ):
            break
        chosen = k
    return chosen


def describe(e: Estimate, *, cached: bool = True) -> str:
    """One line of an estimate; ``cached=False`` leaves out the cached step (a run that
    will not keep the frozen layers' output: too short, or several processes)."""
    on = f" on {e.quantize}" if e.quantize != "none" else ""
    per = ""
    if e.devices > 1:
        per = f" per device of {e.devices} ({'FSDP2' if e.fsdp else 'DDP'})"
    worst = ""
    if e.worst_step_time_s is not None and e.worst_step_time_s > e.step_time_s * 1.005:
        worst = f" typical, ~{e.worst_step_time_s:.2f} s on the longest examples"
    cache = ""
    if e.cached_step_time_s is not None and cached:
        cache = f", ~{e.cached_step_time_s:.2f} s once the frozen layers' output is cached"
    return (
        f"{e.method} {e.options or ''}{on} freeze-below {e.freeze_below}: "
        f"~{format_bytes(e.peak_bytes)}{per}, ~{e.step_time_s:.2f} s/step{worst}{cache}"
    )


def activation_bytes_per_layer(
    model: nn.Module,
    method: str,
    options: dict | None,
    batch: dict[str, torch.Tensor],
    autocast=contextlib.nullcontext,
) -> int:
    """Bytes autograd saves for one trained layer (forward only, on mini models)."""
    from ..training.loss import target_loss

    device = next(model.parameters()).device
    totals = []
    for n_trained in (1, 2):
        mini = _mini_model(model, 1 + n_trained, device)
        m = _costing_method(method, options).prepare(mini, list(range(1, 1 + n_trained)))
        freeze_below(m, 1)
        saved = _SavedBytes(m)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), autocast():
            target_loss(m, {k: v.to(device) for k, v in batch.items()})
        totals.append(saved.total)
        del mini, m
    return max(totals[1] - totals[0], 0)


def calibration_batch(examples, batch_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The ``batch_size`` longest examples: the batch that sets a run's peak memory."""
    from ..data import collate

    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:batch_size]
    return collate(longest, pad_id)


def sampled_batches(n: int, batch_size: int, draws: int = 512) -> list[list[int]]:
    """The full batches of the first epochs the trainer draws with seed 0
    (:func:`~slimtune.data.epoch_batches`), at least ``draws`` of them or one epoch's."""
    from ..data import epoch_batches

    epochs = max(1, -(-draws * batch_size // max(n, 1)))
    out = [
        b
        for epoch in range(epochs)
        for b in epoch_batches(n, batch_size, 0, epoch)
        if len(b) == batch_size
    ]
    return out or [list(range(n))]


def typical_batch(
    examples, batch_size: int, pad_id: int, draws: int = 512
) -> dict[str, torch.Tensor]:
    """A batch the trainer would draw, of the median padded width over random batches.

    A step's time grows with its batch's width, so the median width's step is the median
    step of a run; the worst case (:func:`calibration_batch`) is what memory must fit, but
    on data with a long tail of lengths it is far from what most steps cost.
    """
    from ..data import collate

    batches = sampled_batches(len(examples), batch_size, draws)
    lengths = [len(e.input_ids) for e in examples]
    widths = [max(lengths[i] for i in b) for b in batches]
    median = statistics.median_low(widths)
    chosen = batches[widths.index(median)]
    return collate([examples[i] for i in chosen], pad_id)


def synthetic_batch(vocab: int, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class Plan:
    candidates: list[Estimate]
    choice: Estimate | None
    reason: str
    budget_memory: int | None
    budget_step_time: float | None
    quantizations: list[str] = field(default_factory=lambda: ["none"])
    weight_bytes: dict[str, int] = field(default_factory=dict)  # per quantization considered
    shapes: dict[str, list[int]] = field(default_factory=dict)  # worst / typical batch shape

    def to_dict(self) -> dict:
        from .evidence import NEAR_TIE, SOURCES

        return {
            "shapes": self.shapes,
            "near_tie": NEAR_TIE,
            "evidence_sources": SOURCES,
            "candidates": [c.to_dict() for c in self.candidates],
            "choice": self.choice.to_dict() if self.choice else None,
            "reason": self.reason,
            "budget_memory": self.budget_memory,
            "budget_step_time": self.budget_step_time,
            "quantizations": self.quantizations,
            "weight_bytes": self.weight_bytes,
        }


# the methods as the evidence measured them (evidence.py): LoRA r=16 with alpha 32
DEFAULT_CANDIDATES: list[tuple[str, dict]] = [
    ("full", {}),
    ("lora", {"r": 8}),
    ("lora", {"r": 16, "alpha": 32}),
]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _size_name(n: int) -> str:
    """8030261248 -> '8.03B' (parameters)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _quantization_reason(
    model: nn.Module, best: Estimate, rows: list[Estimate], resident_none: int
) -> str:
    """Why the choice's base is (not) quantized, in bytes: '' when only one was considered."""
    kinds = {e.quantize for e in rows}
    if len(kinds) == 1 and best.quantize == "none":
        return ""
    block, rest = _weight_counts(model)
    dtype = _float_dtype(model)
    size = _size_name(block + rest // dtype.itemsize)
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if best.quantize == "none":
        others = ", ".join(
            f"{q} would bring the weights to {format_bytes(weight_bytes(model, q))}"
            for q in sorted(kinds - {"none"})
        )
        return (
            f"the unquantized base fits at this expected quality, so it stays in {dtype_name} "
            f"({others})"
        )
    head = (
        f"{size} in {dtype_name} needs ~{format_bytes(resident_none)} resident; "
        f"{best.quantize} brings the weights to "
        f"{format_bytes(weight_bytes(model, best.quantize))} "
        f"(from {format_bytes(weight_bytes(model, 'none'))}): "
    )
    plain = [e for e in rows if e.quantize == "none"]
    plain_fits = [e for e in plain if e.fits]
    if not plain:
        return head + f"{best.quantize} as asked (--quantize {best.quantize})"
    if not plain_fits:
        return head + "nothing on the unquantized base fits the budget"
    top = max(plain_fits, key=lambda e: e.expected_quality or e.predicted_gain or 0)
    return head + (
        f"it fits with more layers trained (freeze-below {best.freeze_below}, gain "
        f"{best.predicted_gain or 0:.2f}) than the unquantized base (at best {_label(top)} "
        f"freeze-below {top.freeze_below}, gain {top.predicted_gain or 0:.2f})"
    )


def _label(e: Estimate) -> str:
    """'lora r16', 'full': the method as the evidence names it."""
    return e.method + (f" r{e.options['r']}" if "r" in e.options else "")


def _layers(e: Estimate) -> str:
    on = f" on {e.quantize}" if e.quantize != "none" else ""
    frozen = f"layers 0-{e.freeze_below - 1} frozen" if e.freeze_below else "every layer trained"
    return f"{_label(e)}{on}, {frozen}"


def lr_policy(method: str) -> str:
    """Who sets ``method``'s rate when a plan's choice is trained: "range test" (full: its
    default range test chooses for the model and data), "scaled" (a method with a
    nonzero ``lr_weight_exponent``: train scales the swept rate to the model's weights,
    training/lr_scale.py), or "fixed" (lora, dora: the evidence's rate, which a plan pins
    with --lr)."""
    from ..methods import METHODS

    cls = METHODS.get(method)
    if cls is not None and cls.auto_lr:
        return "range test"
    if cls is not None and cls.lr_weight_exponent:
        return "scaled"
    return "fixed"


def _weigh_quality(rows: list[Estimate], model_name: str | None) -> bool:
    """Each row's prior (its method's measured score relative to LoRA r8's on
    ``model_name``, :mod:`.evidence`) and expected quality ``prior x G(k)``. A method
    without measurements is ranked as the weakest measured method of the table (1.0 when
    none is measured), and says so. Returns whether the priors come from other models."""
    from .evidence import prior

    priors = {id(e): prior(e.method, e.options, model_name) for e in rows}
    known = [p.relative for p in priors.values() if p is not None]
    fallback = min(known) if known else 1.0
    for e in rows:
        p = priors[id(e)]
        if p is not None:
            e.prior, e.lr, e.evidence = p.relative, p.lr, p.cite()
        else:
            e.prior = fallback
            e.notes.append("no evidence: ranked as the weakest measured method")
        e.expected_quality = e.prior * (e.predicted_gain if e.predicted_gain is not None else 1.0)
    return any(p is not None and p.other_models for p in priors.values())


def choose(fitting: list[Estimate]) -> tuple[Estimate, Estimate]:
    """(the choice, the highest expected quality) among ``fitting`` candidates.

    Expected quality decides; differences under :data:`~.evidence.NEAR_TIE` are within
    the evidence's noise, so among those the unquantized base (quantizing cost accuracy
    in every measurement), then a measured method (an unmeasured one's prior is a
    stand-in), then the shortest typical step wins.
    """
    from .evidence import NEAR_TIE

    def quality(e: Estimate) -> float:
        return e.expected_quality if e.expected_quality is not None else e.predicted_gain or 0.0

    best = max(fitting, key=lambda e: (quality(e), e.quantize == "none", -e.step_time_s))
    near = [e for e in fitting if quality(e) >= quality(best) - NEAR_TIE]
    return min(near, key=lambda e: (e.quantize != "none", e.evidence is None, e.step_time_s)), best


def explain(
    choice: Estimate,
    best: Estimate,
    fitting: list[Estimate],
    budget: list[str],
    why_q: str = "",
    other_models: bool = False,
) -> str:
    """Why ``choice``, one line each: what it is and costs, its expected quality against the
    best and the fastest candidates, the evidence behind its prior, and what that is worth.
    ``why_q``: why its base is (not) quantized, when that was a question;
    ``other_models``: the priors were measured on other models than the one planned."""
    from .evidence import NEAR_TIE

    q = choice.expected_quality or 0.0
    g = choice.predicted_gain if choice.predicted_gain is not None else 1.0
    head = f"{_layers(choice)} ({describe(choice)})"
    lines = [head + (f", within the budget ({', '.join(budget)})" if budget else "")]
    quality = (
        f"quality: expected {q:.3f} x LoRA r8's score (method prior {choice.prior or 0:.3f} "
        f"x gain G({choice.freeze_below}) {g:.3f}), "
    )
    if best is choice:
        lines.append(quality + "the highest of the candidates that fit")
    else:
        lines.append(
            quality + f"within {100 * NEAR_TIE:.0f}% (the evidence's noise) of the highest, "
            f"{_layers(best)} ({best.expected_quality or 0:.3f}), at "
            f"{choice.step_time_s / best.step_time_s:.2f}x its typical step"
        )
    fastest = min(fitting, key=lambda e: e.step_time_s)
    if fastest is not choice:
        fq = fastest.expected_quality or 0.0
        lines.append(
            f"cost: the fastest that fits, {_layers(fastest)} (~{fastest.step_time_s:.2f} s "
            f"against ~{choice.step_time_s:.2f} s), expects {fq:.3f}, {q - fq:.3f} less"
        )
    lowest = min(fitting, key=lambda e: e.expected_quality or 0.0)
    if _label(lowest) != _label(choice):
        lines.append(f"the lowest expected: {_layers(lowest)}, {lowest.expected_quality or 0:.3f}")
    if choice.evidence:
        lines.append(f"evidence for {_label(choice)}: {choice.evidence}")
    policy = lr_policy(choice.method)
    if choice.lr is not None and policy == "range test":
        lines.append(
            f"the evidence was measured at lr {choice.lr:g}; {choice.method}'s default range "
            "test (--lr auto) chooses the rate for this model and data"
        )
    elif choice.lr is not None and policy == "scaled":
        lines.append(
            f"the evidence was measured at lr {choice.lr:g}; train scales "
            f"{choice.method}'s default rate to this model's weight size (lr_scale.py)"
        )
    elif choice.lr is not None:
        lines.append(f"train it at --lr {choice.lr:g}, the rate behind that evidence")
    if why_q:
        lines.append(why_q.strip("; "))
    lines.append(
        "the priors are scores measured on the bundled tasks (salf/evidence.py)"
        + (", on other models than this one" if other_models else "")
        + ": for a task of another kind they are a guess"
    )
    return "\n  ".join(lines)


def make_plan(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    gain: list[float],
    *,
    candidates: list[tuple[str, dict]] | None = None,
    budget_memory: int | None = None,
    budget_step_time: float | None = None,
    recommended_freeze_below: int | None = None,
    autocast=contextlib.nullcontext,
    progress=None,
    quantizations: list[str] | None = None,
    devices: int = 1,
    fsdp: bool = False,
    typical_batch: dict[str, torch.Tensor] | None = None,
    model_name: str | None = None,
) -> Plan:
    """Estimate every (method, base quantization, freeze_below) worth considering and pick
    one under the budget.

    ``batch`` is the worst case (the longest examples: memory must fit it),
    ``typical_batch`` a batch of the run's median width (step times, and so time budgets,
    are of it; default: ``batch``). ``quantizations``: how the base may be stored
    (default: as ``model`` is loaded); a method that cannot train on a quantized base is
    costed only on the unquantized one. For each method and quantization the freeze_below
    values considered are: every layer trained (0), the analysis' recommendation, and the
    shallowest freeze_below the budget allows (deepest-first unfreezing). The pick
    (:func:`choose`) is the fitting candidate of the highest expected quality, the
    method's measured prior (:mod:`.evidence`) times the analysis' gain ``G(k)``; within the evidence's noise
    the unquantized base, then the shortest typical step. ``devices``/``fsdp``: the run's
    processes (one device each, ``batch`` per device) and whether it shards (methods that
    cannot are left out); memory is per device. ``model_name``: the packaged model's spec
    (e.g. ``default``), whose own measurements the priors use where there are some.
    """
    quantizations = list(quantizations or [quantization_of(model)])
    device = next(model.parameters()).device
    if typical_batch is not None and typical_batch["input_ids"].shape == batch["input_ids"].shape:
        typical_batch = None  # no narrower: the worst case's times are the typical ones
    # once: the estimates differ only by what they cost
    measured = _measure_resident(device, model, quantizations)
    rows: list[Estimate] = []
    for quantize in quantizations:
        for method, options in candidates or DEFAULT_CANDIDATES:
            if not takes_quantization(method, quantize):
                continue
            if fsdp and (quantize != "none" or not method_class(method).shardable):
                continue
            if progress:
                on = f" on {quantize}" if quantize != "none" else ""
                progress(f"calibrating {method} {options or ''}{on}")
            costs = calibrate(
                model,
                method,
                options,
                batch,
                autocast=autocast,
                quantize=quantize,
                measured_resident=measured,
                typical_batch=typical_batch,
            )
            ks = {0}
            if recommended_freeze_below is not None:
                ks.add(recommended_freeze_below)
            kb = budget_freeze_below(
                costs,
                memory=budget_memory,
                step_time=budget_step_time,
                devices=devices,
                fsdp=fsdp,
            )
            if kb is not None:
                ks.add(kb)
            for k in sorted(ks):
                e = estimate(costs, k, devices=devices, fsdp=fsdp)
                e.predicted_gain = gain[k]
                e.fits = (budget_memory is None or e.peak_bytes <= budget_memory) and (
                    budget_step_time is None or e.step_time_s <= budget_step_time
                )
                if k == kb and (budget_memory or budget_step_time):
                    e.notes.append("budget policy")
                if k == recommended_freeze_below:
                    e.notes.append("analysis' choice")
                rows.append(e)
    weights = {q: weight_bytes(model, q) for q in quantizations}
    other_models = _weigh_quality(rows, model_name)

    shapes = {"worst": list(batch["input_ids"].shape)}
    shapes["typical"] = list((typical_batch or batch)["input_ids"].shape)

    def plan(choice: Estimate | None, reason: str) -> Plan:
        return Plan(
            rows, choice, reason, budget_memory, budget_step_time, quantizations, weights, shapes
        )

    if not rows:
        sharded = " sharded (--fsdp)" if fsdp else ""
        raise UserInputError(
            f"no candidate method trains{sharded} on the base as {'/'.join(quantizations)}"
        )
    fitting = [e for e in rows if e.fits]
    if not fitting:
        smallest = min(rows, key=lambda e: e.peak_bytes)
        return plan(None, "nothing fits the budget; the smallest estimate is " + describe(smallest))
    choice, best = choose(fitting)
    budget = []
    if budget_memory:
        budget.append(f"memory {format_bytes(budget_memory)}, the longest examples")
    if budget_step_time:
        budget.append(f"typical step {budget_step_time:.2f} s")
    why_q = _quantization_reason(model, choice, rows, resident_bytes(model, "none", measured))
    return plan(choice, explain(choice, best, fitting, budget, why_q, other_models))


def estimate_static(
    model: nn.Module,
    method: str,
    batch: dict[str, torch.Tensor],
    activation_bytes: int,
    options: dict | None = None,
) -> list[dict]:
    """Per candidate freeze_below, costs that need no timing: trainable parameters, the share of
    backward FLOPs left (relative to training every layer) and saved activation memory."""
    device = next(model.parameters()).device
    L = len(decoder_layers(model))
    per_layer = sum(p.numel() for p in _trained_layer_params(model, method, options, device))
    declared = method_class(method)
    emb = (
        base_model(model).get_input_embeddings().weight.numel() if declared.trains_embeddings else 0
    )
    fwd = _flops_per_token_layer(model, batch["input_ids"].shape[1]) * batch["input_ids"].numel()
    per_bwd = (2.0 if declared.weight_grads else 1.0) * fwd
    rows = []
    for k in range(L):
        n = L - k
        rows.append(
            {
                "freeze_below": k,
                "trainable_params": n * per_layer + (emb if k == 0 else 0),
                "backward_flops": n * per_bwd,
                "backward_flops_share": n / L,
                "activation_bytes": n * activation_bytes,
            }
        )
    return rows


def freeze_costs(
    model: nn.Module,
    method: str,
    examples,
    batch_size: int,
    pad_id: int,
    options: dict | None = None,
) -> list[dict]:
    """The static costs of training ``method`` per candidate freeze_below (see
    :func:`estimate_static`) for a batch of the ``batch_size`` longest ``examples``: what
    ``slimtune analyze`` shows next to the analysis, without timing anything."""
    batch = calibration_batch(examples, batch_size, pad_id)
    act = activation_bytes_per_layer(model, method, options, batch)
    return estimate_static(model, method, batch, act, options)
