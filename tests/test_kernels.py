"""The GPU fast path's switches, on the CPU CI has: fused kernels only where they run, said
once where they are missing, and LoRA computing on the autocast dtype under autocast."""

import contextlib

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


def test_lora_under_autocast_runs_fused_in_bf16_with_fp32_master_weights():
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
    assert fast_dtypes == set()  # the fused function ran instead of peft's lora_A modules
    assert all(g.dtype == torch.float32 for g in fast_grads)  # fp32 master weights' grads
    assert fast_loss == pytest.approx(slow_loss, rel=2e-2)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=0.1, atol=0.1 * float(b.abs().max()) + 1e-6)
    # leaving the context restores peft's casting (e.g. for inference without autocast)
    assert _adapter_input_dtypes(
        model, lambda: model(input_ids=ids.clone(), attention_mask=torch.ones_like(ids))
    ) == {torch.float32}


def _peft_lora(dropout: float, bias: bool, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=bias), torch.nn.Linear(16, 8))
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "1"], use_dora=dora
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _run(model, x, seed: int):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in both paths
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _fused_matches_peft(model, x, tol: float) -> None:
    """Outputs, input gradients and the 4 adapter gradients of the fused function (on both
    adapted layers) are peft's, with the same dropout masks."""
    from slimtune.methods.lora_fused import fused_lora

    ref = _run(model, x, seed=7)
    with fused_lora(model) as switched:
        fused = _run(model, x, seed=7)
    assert switched == 2
    torch.testing.assert_close(fused[0], ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(fused[1], ref[1], rtol=tol, atol=tol)
    assert fused[2].keys() == ref[2].keys() and len(ref[2]) == 4
    for name in ref[2]:
        torch.testing.assert_close(fused[2][name], ref[2][name], rtol=tol, atol=tol)


@pytest.mark.parametrize(("dropout", "bias"), [(0.0, True), (0.0, False), (0.2, True)])
def test_fused_lora_matches_peft_forward_and_backward(dropout, bias):

    model = _peft_lora(dropout, bias)
    model.train()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    _fused_matches_peft(model, x, tol=1e-5)
    # leaving the block gives peft its forward back
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("fused_adamw", [False, True])
def test_fused_lora_follows_every_optimizer_step_and_in_place_write(fused_adamw):
    """The fused path computes from copies of the adapters made ahead (one pass for all
    layers): after each optimizer step, and after any in-place write, it must compute
    with the new weights. Three AdamW steps fused give peft's weights and losses."""
    from slimtune.methods.lora_fused import fused_lora

    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5))

    def train(fused: bool):
        model = _peft_lora(0.0, True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.05, fused=fused_adamw)  # fused: no version bump
        losses = []
        with fused_lora(model) if fused else contextlib.nullcontext():
            for _ in range(3):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            with torch.no_grad():  # an in-place write outside the optimizer
                model.base_model.model[0].lora_B["default"].weight.mul_(-1.0)
                losses.append(model(x).square().mean().item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    (ref_losses, ref_weights), (losses, weights) = train(False), train(True)
    assert ref_losses[1] != ref_losses[0]  # the steps changed the output
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6)


def test_fused_lora_without_gradients_gives_peft_outputs():
    """Evaluation and generation run the fused path with no autograd function (no gradient
    to record): the same outputs as peft's forward, in eval mode with dropout configured."""
    from slimtune.methods.lora_fused import fused_lora

    model = _peft_lora(0.2, True).eval()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x)
        with fused_lora(model) as switched:
            out = model(x)
    assert switched == 2
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_lora_leaves_dora_to_peft():
    from slimtune.methods.lora_fused import fused_lora

    model = _peft_lora(0.0, True, dora=True)
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(2))
    ref = _run(model, x, seed=0)
    with fused_lora(model):
        same = _run(model, x, seed=0)
    torch.testing.assert_close(same[0], ref[0])
    torch.testing.assert_close(same[1], ref[1])


def test_fused_lora_leaves_a_base_with_its_own_forward_to_peft():
    """RoSA's sparse delta gives the base linear an instance forward: the fused function,
    which reads the base weight itself, must not bypass it."""
    from slimtune.methods.lora_fused import fused_lora

    model = _peft_lora(0.0, True)
    base = model.base_model.model[0].base_layer
    base.forward = lambda x: torch.nn.functional.linear(x, base.weight, base.bias) + 1.0
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
    ref = _run(model, x, seed=0)
    with fused_lora(model) as switched:
        same = _run(model, x, seed=0)
    assert switched == 1  # the second layer only
    torch.testing.assert_close(same[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same[1], ref[1], rtol=1e-5, atol=1e-5)


def test_compute_context_of_a_peft_method_whose_layers_have_no_cast_switch():
    """SHiRA's peft layers have no ``cast_input_dtype_enabled``: peft's
    ``disable_input_dtype_casting`` read it on every tuner layer and raised AttributeError,
    so every SHiRA run under autocast (a GPU's default bf16) failed before its first step."""
    model = tiny_llama(64, layers=2, hidden=32).to(torch.bfloat16)
    method = get_method("shira", {"density": 0.1})
    model = method.prepare(model, [0, 1])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with method.compute_context(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = target_loss(model, batch)
        loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compute_context_restores_peft_casting_after_an_exception():
    model, method = _lora_on_bf16_base()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers
    with pytest.raises(RuntimeError), method.compute_context(model):
        assert not any(m.cast_input_dtype_enabled for m in layers)
        raise RuntimeError
    assert all(m.cast_input_dtype_enabled for m in layers)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_trained_head_keeps_the_fp32_accumulating_chunked_loss(monkeypatch):
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)

    class CudaLike(torch.Tensor):  # is_cuda without a GPU: only the guard is under test
        @property
        def is_cuda(self):
            return True

    h = torch.randn(4, 8).as_subclass(CudaLike)
    w = torch.nn.Parameter(torch.randn(64, 8))  # a head that trains
    assert kernels.fused_linear_cross_entropy_sum(h, w, torch.zeros(4).long()) is None


def test_a_bad_slimtune_kernels_value_is_a_clear_error_before_training(
    monkeypatch, tiny_dir, intent_file, tmp_path
):
    from slimtune.errors import UserInputError

    from .conftest import train_tiny

    monkeypatch.setenv("SLIMTUNE_KERNELS", "of")
    with pytest.raises(UserInputError, match="SLIMTUNE_KERNELS='of': use one of auto, off"):
        train_tiny(tiny_dir, intent_file, tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run" / "delta").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_on_a_4bit_base_matches_peft(dropout, monkeypatch):
    """On bitsandbytes' 4-bit layers (--quantize nf4) the fused function dequantizes the
    base for the GEMMs and gives peft's outputs and gradients."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from slimtune.model.quantize import _quantized_linear

    torch.manual_seed(0)
    base = torch.nn.Sequential(
        *(
            _quantized_linear(lin, "nf4", torch.float32).to("cpu")
            for lin in (torch.nn.Linear(64, 64), torch.nn.Linear(64, 8, bias=False))
        )
    )
    base.is_loaded_in_4bit = True  # what peft reads to use its bitsandbytes LoRA layers
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "1"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.train()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    _fused_matches_peft(model, x, tol=1e-4)

    # without gradients the base is bitsandbytes' own layer, which takes its 4-bit GEMV for
    # a single token (generation); slimtune does not dequantize the weight itself
    from slimtune.methods import lora_fused

    model.eval()
    with torch.no_grad():
        ref = model(x)
        with lora_fused.fused_lora(model), monkeypatch.context() as patch:
            patch.setattr(lora_fused, "_base_weight", _must_not_dequantize)
            fused = model(x)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def _must_not_dequantize(*_):
    raise AssertionError("the no-grad path dequantized the 4-bit weight itself")


def test_an_architecture_whose_kernels_broke_generation_trains_without_them(monkeypatch, said):
    """Gemma 3's Liger patch trained but broke generation on a GPU (BENCHMARKS.md): it is
    not applied, and the run says why once, before Liger is even imported."""
    import transformers

    from slimtune.testing import ARCHITECTURES

    config_name, model_name = ARCHITECTURES["gemma3"]
    config = getattr(transformers, config_name)(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = getattr(transformers, model_name)(config)
    monkeypatch.delenv("SLIMTUNE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    monkeypatch.setattr(kernels, "_supported_type", lambda m: pytest.fail("liger consulted"))
    assert kernels.apply_fused_kernels(model, "cuda") == []
    assert kernels.apply_fused_kernels(model, "cuda") == []
    assert len(said) == 1 and "gemma3_text" in said[0] and "generation" in said[0]


@pytest.fixture
def cudnn_flag():
    """torch's process-wide cuDNN-attention switch, put back after the test."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cudnn_attention_leaves_sdpa_only_for_cuda_runs(monkeypatch, cudnn_flag, said):
    """cuDNN's attention builds a graph per input shape (BENCHMARKS.md, where a small
    model's step goes): CUDA runs attend without it; CPU runs leave torch's switch as
    it is, and SLIMTUNE_ATTENTION=torch keeps torch's own choice on CUDA."""
    monkeypatch.delenv("SLIMTUNE_ATTENTION", raising=False)
    assert kernels.choose_attention("cpu") is False
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("SLIMTUNE_ATTENTION", "torch")
    assert kernels.choose_attention(torch.device("cuda")) is False
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("SLIMTUNE_ATTENTION", "auto")
    assert kernels.choose_attention("cuda:1") is True
    assert kernels.choose_attention("cuda") is True
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert len(said) == 1 and "cuDNN" in said[0] and "SLIMTUNE_ATTENTION=torch" in said[0]
    # the other backends stay as they were
    assert (
        torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    )


def test_a_bad_slimtune_attention_value_is_a_clear_error_before_loading(
    monkeypatch, tiny_dir, intent_file, tmp_path, cudnn_flag
):
    from slimtune.errors import UserInputError

    from .conftest import train_tiny

    monkeypatch.setenv("SLIMTUNE_ATTENTION", "cudnn")
    with pytest.raises(UserInputError, match="SLIMTUNE_ATTENTION='cudnn': use one of auto, torch"):
        train_tiny(tiny_dir, intent_file, tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run" / "delta").exists()
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_final_evaluation_scores_lora_as_it_was_trained(
    monkeypatch, tiny_dir, intent_file, tmp_path
):
    """Under autocast the adapters train on the layer's bf16 input (the method's compute
    context); the final evaluation runs in the same context, not through peft's fp32
    copies, so the delta is scored as it was trained (and takes the lean forward)."""
    from slimtune.methods import lora_fused

    from .conftest import train_tiny

    calls = {"forward": 0, "autograd": 0}
    forward, function = lora_fused._forward, lora_fused.LoraLinearFunction.apply

    def counting(*args):
        calls["forward"] += 1
        return forward(*args)

    def counting_function(*args):
        calls["autograd"] += 1
        return function(*args)

    # an fp32 run first, in the same process: accelerate's process-wide state refused the
    # bf16 Accelerator after it, until the trainer dropped a single process' old state
    train_tiny(
        tiny_dir, intent_file, tmp_path / "fp32", method="lora", precision="fp32", max_steps=1
    )
    monkeypatch.setattr(lora_fused, "_forward", counting)
    monkeypatch.setattr(lora_fused.LoraLinearFunction, "apply", counting_function)
    result = train_tiny(
        tiny_dir, intent_file, tmp_path / "run", method="lora", precision="bf16", max_steps=2
    )
    assert calls["autograd"] > 0  # the training steps
    assert calls["forward"] > calls["autograd"]  # and the evaluation, without autograd
    assert result.summary["eval_accuracy"] >= 0.0


def test_cached_and_per_call_adapter_copies_round_alike():
    """The copies made ahead (every layer at once) and those a forward makes itself (FSDP2,
    compiled layers, inference mode) are the same bits, also at a scale that is not a power
    of two (scaled in fp32, then cast once)."""
    from slimtune.methods.compute_copies import ComputeCopies, cast_now

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(16, 8, generator=gen)
    copies = ComputeCopies(cached=True)
    i = copies.add(a, b, 1.3)
    cached, per_call = copies.get(i, a, b, 1.3, torch.bfloat16), cast_now(a, b, 1.3, torch.bfloat16)
    assert cached[0].dtype == torch.bfloat16
    assert torch.equal(cached[0], per_call[0]) and torch.equal(cached[1], per_call[1])


def test_a_callers_own_accelerator_is_not_torn_down(tiny_dir, intent_file, tmp_path):
    """A run whose precision differs from an Accelerator the caller made in the same process
    stops with a clear error: slimtune drops only the process-wide state it made itself."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from slimtune.errors import UserInputError

    from .conftest import train_tiny

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        mine = Accelerator(cpu=True, mixed_precision="bf16")
        with pytest.raises(UserInputError, match=r"already set up accelerate.*'bf16'"):
            train_tiny(tiny_dir, intent_file, tmp_path / "run", precision="fp32", max_steps=1)
        assert mine.state.mixed_precision == "bf16"  # still the caller's
        assert not (tmp_path / "run" / "delta").exists()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
