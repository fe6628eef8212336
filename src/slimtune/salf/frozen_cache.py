"""Run the frozen layers once per training example, not once per epoch.

Below the cut (:func:`freezing.freeze_below`) nothing trains, so what the last frozen layer
hands up for an example is the same every time the example comes back. ``train
--cache-frozen`` keeps it, per example, the first time a micro-batch computes it; a later
micro-batch whose examples are all kept skips layers ``0 .. k-1``: they hand their input
through untouched and the last of them returns the kept states, padded to the batch's
width. What the layers above the cut see at the real positions is what they would have seen
(BENCHMARKS.md, "train --cache-frozen", for what it buys).

Where it differs, by design:

* the frozen layers run in eval mode whenever the cache is on, so a model with dropout
  below the cut gets one fixed draw-free output per example (every common LLM config has
  dropout 0 there);
* padding positions get zeros instead of what the frozen layers computed for them; nothing
  that is not padding reads them (they are masked as keys; experts do not route them);
* a kept state came from a batch of another width; kernels may round such a batch
  differently in the last bits, as they do between any two paddings of one example.

The states take ``tokens x hidden size x element size`` in all. A CUDA run keeps them on
the device where they take at most :data:`DEVICE_SHARE` of its memory (the default model's
bundled task: 44 MiB in bf16), else in host memory, copied up per batch from pinned
memory; the host's share is checked before the run starts. The cache lives as long as the
run (the trainer closes it): a resumed run starts it empty, and every evaluation runs the
real layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..errors import UserInputError
from ..model.anatomy import base_model, decoder_layers, input_embeddings

# share of the host's available memory the cache may take when asked for, and by default
HOST_SHARE = 0.5
AUTO_HOST_SHARE = 0.25
# share of a GPU's memory the cache may take there (the rest is the training step's)
DEVICE_SHARE = 0.05


@dataclass
class _Batch:
    ids: Sequence[int]
    mask: torch.Tensor  # (batch, width) attention mask: 1 at real positions
    hit: bool


class FrozenOutputCache:
    """Per training example, the hidden states leaving frozen layer ``k - 1``, kept on ``store``.

    Consulted only inside :meth:`serving`, i.e. for training micro-batches that name their
    examples; every other forward (evaluation, generation, the analysis) runs the layers.
    """

    def __init__(self, model: nn.Module, k: int, store: torch.device | str = "cpu") -> None:
        layers = decoder_layers(model)
        if not 0 < k <= len(layers):
            raise ValueError(f"a cache needs frozen layers: k = {k} of {len(layers)}")
        self.k = k
        self.store = _indexed(torch.device(store))  # where the states are kept
        self.rows: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.served = 0  # micro-batches that skipped the frozen layers
        self.computed = 0  # micro-batches that ran them (and filled the cache)
        self._active: _Batch | None = None
        self._templates: dict[int, tuple[type, int]] = {}
        self._unwrapped: list[tuple[nn.Module, object]] = []
        for j, layer in enumerate(layers[:k]):
            forward = layer.__dict__.get("forward")
            if not getattr(forward, "slimtune_frozen", False):
                raise ValueError(f"layer {j} is not frozen (freeze_below first)")
            self._unwrapped.append((layer, forward))
            layer.forward = self._wrap(j, layer, forward)

    def close(self) -> None:
        """Give the frozen layers their uncached forward back and free the kept states (the
        trained model outlives the run: evaluation, generation, another run on it)."""
        for layer, forward in self._unwrapped:
            if "forward" in layer.__dict__:  # unfreeze_all may have removed it already
                layer.forward = forward
        self._unwrapped.clear()
        self.rows.clear()

    @contextlib.contextmanager
    def serving(self, ids: Sequence[int], attention_mask: torch.Tensor) -> Iterator[None]:
        """The block's one forward is of the examples ``ids`` (the batch's rows, in order)."""
        hit = bool(ids) and all(i in self.rows for i in ids)
        self._active = _Batch(list(ids), attention_mask, hit)
        try:
            yield
        finally:
            self._active = None
        if hit:
            self.served += 1
        else:
            self.computed += 1

    def summary(self) -> dict[str, int | str]:
        return {
            "freeze_below": self.k,
            "store": str(self.store),
            "examples": len(self.rows),
            "bytes": self.bytes,
            "served": self.served,
            "computed": self.computed,
        }

    def _wrap(self, j: int, layer: nn.Module, forward):
        last = j == self.k - 1

        @functools.wraps(forward)  # keeps forward's slimtune_frozen mark
        def run(*args, **kwargs):
            batch = self._active
            if batch is None:
                return forward(*args, **kwargs)
            if batch.hit:
                if last:
                    return self._like(j, self._assemble(batch, args, kwargs))
                return self._like(j, _hidden_input(args, kwargs))
            was = layer.training
            layer.train(False)
            try:
                out = forward(*args, **kwargs)
            finally:
                layer.train(was)
            self._templates[j] = (type(out), len(out) if isinstance(out, tuple) else 0)
            if last:
                self._keep(batch, out[0] if isinstance(out, tuple) else out)
            return out

        # under train --compile the layers' calls are compiled: the lookup stays eager,
        # what it calls (the frozen layer's own forward) is compiled as before
        return torch.compiler.disable(run, recursive=False)

    def _keep(self, batch: _Batch, hidden: torch.Tensor) -> None:
        mask = batch.mask.to("cpu", dtype=torch.bool)  # once per example's first sight
        for row, i in enumerate(batch.ids):
            if i in self.rows:
                continue
            n = int(mask[row].sum())
            if not bool(mask[row, :n].all()):  # data.collate pads on the right
                raise ValueError("the frozen layers' cache takes right-padded batches only")
            kept = hidden[row, :n].detach().to(self.store, copy=True)
            self.rows[i] = kept
            self.bytes += kept.numel() * kept.element_size()

    def _assemble(self, batch: _Batch, args, kwargs) -> torch.Tensor:
        """The batch's kept states, right-padded with zeros to its width, on its device:
        built where they are kept, one copy up from the host (asynchronous, from pinned
        memory) when they are kept there."""
        device = _hidden_input(args, kwargs).device
        rows = [self.rows[i] for i in batch.ids]
        width = batch.mask.shape[1]
        if self.store == device:
            out = pad_sequence(rows, batch_first=True)
            return F.pad(out, (0, 0, 0, width - out.shape[1])) if out.shape[1] < width else out
        pin = device.type == "cuda"
        out = torch.zeros(
            (len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype, pin_memory=pin
        )
        for row, kept in enumerate(rows):
            out[row, : kept.shape[0]] = kept
        return out.to(device, non_blocking=pin)

    def _like(self, j: int, hidden: torch.Tensor):
        """``hidden`` in the shape layer ``j`` returns (a tensor, or a tuple led by one)."""
        kind, n = self._templates[j]
        return (hidden,) + (None,) * (n - 1) if kind is tuple else hidden


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the index its tensors report (``cuda:0``), so devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _hidden_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def expected_bytes(model: nn.Module, lengths: Sequence[int]) -> int:
    """What keeping the states of examples of these ``lengths`` takes: tokens x hidden
    size x element size, the residual stream's width and type read from the embeddings
    (an estimate: autocast may promote the stream to a wider type)."""
    emb = input_embeddings(model)
    if emb is not None:
        hidden, element = emb.weight.shape[-1], emb.weight.element_size()
    else:
        hidden, element = base_model(model).config.hidden_size, 4
    return sum(lengths) * hidden * element


def store_for(
    need: int,
    device: torch.device,
    *,
    processes: int = 1,
    flag: str = "--cache-frozen",
    host_share: float = HOST_SHARE,
) -> torch.device:
    """Where a cache of ``need`` bytes is kept: on ``device`` (a GPU) if it takes at most
    :data:`DEVICE_SHARE` of its memory and a quarter of what is free, else in host memory,
    refused there beyond ``host_share`` of what is available, shared by the
    ``processes`` of this host (each keeps its own). The host memory is read once, before
    the cache fills over the first epoch: the default (``cache_frozen: auto``) keeps a
    wider margin (:data:`AUTO_HOST_SHARE`) than a cache asked for."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(_indexed(device))
        if need <= min(DEVICE_SHARE * total, free / 4):
            return _indexed(device)
    available = psutil.virtual_memory().available
    if need * processes > host_share * available:
        each = f" in each of {processes} processes" if processes > 1 else ""
        raise UserInputError(
            f"{flag}: keeping the frozen layers' output takes {need / 2**30:.2f} GiB of host "
            f"memory{each}, more than {host_share:.0%} of the {available / 2**30:.2f} GiB "
            f"available in all; drop {flag} or train on fewer or shorter examples"
        )
    return torch.device("cpu")
