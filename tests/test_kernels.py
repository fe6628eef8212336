"""The GPU fast path's switches, on the CPU CI has: fused kernels only where they run, said
once where they are missing, and LoRA computing on the autocast dtype under autocast."""

import pytest
import torch

from slimtune.methods import get_method
from slimtune.model import kernels
from slimtune.model.anatomy import decoder_layers
from slimtune.testing import tiny_llama
from slimtune.training.loss import target_loss


@pytest.fixture
def said(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(kernels, "info", lines.append)
    kernels._say_once.cache_clear()
    yield lines
    kernels._say_once.cache_clear()


def test_no_fused_kernels_on_cpu_and_liger_is_not_even_looked_up(monkeypatch, said):
    def looked_up():
        raise AssertionError("liger looked up for a CPU run")

    monkeypatch.setattr(kernels, "liger_installed", looked_up)
    assert kernels.apply_fused_kernels(tiny_llama(64), "cpu") == []
    h = torch.randn(4, 8)
    assert (
        kernels.fused_linear_cross_entropy_sum(h, torch.randn(64, 8), torch.zeros(4).long()) is None
    )
    assert said == []


def test_missing_liger_on_cuda_is_said_once_with_the_install_hint(monkeypatch, said):
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    model = tiny_llama(64)
    assert kernels.apply_fused_kernels(model, "cuda") == []
    assert kernels.apply_fused_kernels(model, torch.device("cuda")) == []
    assert len(said) == 1 and "pip install 'slimtune[gpu]'" in said[0]


def test_kernels_off_says_nothing_and_applies_nothing(monkeypatch, said):
    monkeypatch.setenv("SLIMTUNE_KERNELS", "off")
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.apply_fused_kernels(tiny_llama(64), "cuda") == []
    assert said == []


def _lora_on_bf16_base():
    model = tiny_llama(64, layers=2, hidden=32).to(torch.bfloat16)
    method = get_method("lora", {"r": 4, "dropout": 0.0})
    model = method.prepare(model, list(range(len(decoder_layers(model)))))
    with torch.no_grad():  # a non-zero B, so the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, method


def _adapter_input_dtypes(model, run) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
        for name, m in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_lora_under_autocast_reads_bf16_input_with_fp32_master_weights():
    model, method = _lora_on_bf16_base()
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss_and_grads(fast: bool):
        model.zero_grad(set_to_none=True)
        losses = []

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = target_loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))

        if fast:
            with method.compute_context(model):
                dtypes = _adapter_input_dtypes(model, run)
        else:
            dtypes = _adapter_input_dtypes(model, run)
        return losses[0], [p.grad.clone() for p in adapters], dtypes

    slow_loss, slow_grads, slow_dtypes = loss_and_grads(fast=False)
    fast_loss, fast_grads, fast_dtypes = loss_and_grads(fast=True)
    assert slow_dtypes == {torch.float32}  # peft's copy of each input to fp32
    assert fast_dtypes == {torch.bfloat16}  # the layer's own bf16 input
    assert all(g.dtype == torch.float32 for g in fast_grads)  # fp32 master weights' grads
    assert fast_loss == pytest.approx(slow_loss, rel=2e-2)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=0.1, atol=0.1 * float(b.abs().max()) + 1e-6)
    # leaving the context restores peft's casting (e.g. for inference without autocast)
    assert _adapter_input_dtypes(
        model, lambda: model(input_ids=ids.clone(), attention_mask=torch.ones_like(ids))
    ) == {torch.float32}
