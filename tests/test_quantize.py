"""A quantized frozen base (--quantize nf4|int8): loading, fingerprints, refusals, and sparse
deltas running beside quantized weights (the same delta then applies to the full base)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.errors import UserInputError
from slimtune.methods.sparse import SPARSE_FILE, attach, detach_delta
from slimtune.model.anatomy import decoder_layers, linear_modules
from slimtune.model.loading import fingerprint, load_model
from slimtune.model.quantize import (
    check_quantize,
    dense_weight,
    is_quantized,
    quantization_of,
)

from .conftest import train_tiny

bnb = pytest.importorskip("bitsandbytes")  # a dev dependency: installed by `make test`


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Width 64: bitsandbytes' CPU NF4 blocks are 64 wide, and on layers narrower than that
    its quantization error doubles (a real model's layers are hundreds wide)."""
    from slimtune.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny64") / "model", hidden=64)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_load_keeps_the_full_precision_fingerprint(tiny_dir, kind):
    plain = load_model(str(tiny_dir))
    q = load_model(str(tiny_dir), quantize=kind)
    assert fingerprint(q.model) == fingerprint(plain.model)
    assert quantization_of(q.model) == kind and quantization_of(plain.model) == "none"
    layer = decoder_layers(q.model)[0]
    assert all(
        is_quantized(m) for m in layer.modules() if isinstance(m, nn.Linear)
    )  # every block linear
    assert not is_quantized(q.model.get_output_embeddings())  # the head SALF reads through
    # the quantized weights are the base's, up to the format's rounding
    name = "model.layers.0.mlp.up_proj"
    w, wq = linear_modules(plain.model)[name].weight, dense_weight(linear_modules(q.model)[name])
    err = (wq.float() - w).norm() / w.norm()  # NF4: ~0.1 relative error, int8: < 0.01
    assert 0 < err < (0.12 if kind == "nf4" else 0.02)
    # the default rate's weight scale reads the dequantized weights (not the packed bytes)
    from slimtune.training.lr_scale import weight_rms

    rms, rms_q = weight_rms(plain.model), weight_rms(q.model)
    assert rms is not None and rms_q is not None and rms_q != rms
    assert rms_q == pytest.approx(rms, rel=0.12 if kind == "nf4" else 0.02)


def test_quantize_errors_are_one_line_with_the_hint(monkeypatch):
    with pytest.raises(UserInputError, match="use one of none, nf4, int8"):
        check_quantize("int4", "cpu")
    with pytest.raises(UserInputError, match="does not run on mps"):
        check_quantize("nf4", "mps")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(
        UserInputError, match=r"needs bitsandbytes.*pip install 'slimtune\[quant\]'"
    ):
        check_quantize("nf4", "cpu")
    check_quantize("none", "cpu")  # needs nothing


def test_methods_that_write_base_weights_refuse_a_quantized_base(tiny_dir, intent_file, tmp_path):
    with pytest.raises(UserInputError, match="full cannot train on a quantized base"):
        train_tiny(tiny_dir, intent_file, tmp_path / "f", method="full", quantize="nf4")
    with pytest.raises(UserInputError, match=r"dora cannot .* int8"):
        train_tiny(tiny_dir, intent_file, tmp_path / "d", method="dora", quantize="int8")
    # RoSA too: its sparse part never saw the dense gradient, so the regrow silently never ran
    for method in ("sparse", "rosa"):
        with pytest.raises(UserInputError, match="not supported on a quantized base"):
            train_tiny(
                tiny_dir,
                intent_file,
                tmp_path / method,
                method=method,
                quantize="nf4",
                method_options={"structure": "entries", "regrow_every": 2, "importance": "random"},
            )
    assert not (tmp_path / "f" / "delta").exists()


def _one_quantized_layer(kind: str, seed: int = 0) -> nn.Module:
    """One (out 8, in 64) linear, quantized on the CPU as quantize_model does it."""
    from slimtune.model.quantize import _quantized_linear

    torch.manual_seed(seed)
    return _quantized_linear(nn.Linear(64, 8), kind, torch.float32).to("cpu")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("structure", ["columns", "entries"])
def test_sparse_delta_beside_a_quantized_weight(kind, structure):
    """y = base_q(x) + x S^T, and the values' gradient is (g^T x) at the indices."""
    from slimtune.methods.importance import column_indices

    q = _one_quantized_layer(kind)
    idx = (
        column_indices(torch.tensor([3, 17, 40]), (8, 64))
        if structure == "columns"
        else torch.tensor([0, 70, 129, 300, 511])
    )
    values = torch.randn(idx.numel())
    x = torch.randn(2, 5, 64, requires_grad=True)
    base_out = q(x).detach()
    d = attach(q, idx, values)
    assert d.beside and d.base_values.numel() == 0
    assert (d.cols is not None) == (structure == "columns")
    y = q(x)
    s = torch.zeros(8 * 64).index_put((idx,), values).view(8, 64)
    torch.testing.assert_close(y, base_out + x @ s.t(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    want = (g.reshape(-1, 8).t() @ x.detach().reshape(-1, 64)).view(-1)[idx]
    torch.testing.assert_close(d.values.grad, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="cannot be merged into quantized weights"):
        detach_delta(q, keep_merged=True)
    detach_delta(q, keep_merged=False)
    torch.testing.assert_close(q(x).detach(), base_out)  # the quantized weight never changed


@pytest.mark.parametrize("autocast", [False, True])
def test_scattered_entries_beside_a_quantized_weight_save_no_dense_matrix(autocast):
    """Entries beside a quantized weight (RoSA's default structure): autograd through a
    dense S saved that (out, in) matrix per layer until backward, a full-size copy of every
    trained weight on top of the quantized base. Only the input is saved now, and the
    input's and values' gradients are still exact (bf16 autocast as on a GPU, too)."""
    torch.manual_seed(0)
    q = _one_quantized_layer("nf4")
    idx = torch.tensor([0, 70, 129, 300, 511])
    d = attach(q, idx, torch.randn(idx.numel()))
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        side = d.side_output(x)
    assert saved and 8 * 64 not in saved  # x (2 x 5 x 64), the values and indices, not S
    g = torch.randn_like(side)
    side.backward(g)
    s = torch.zeros(8 * 64).index_put((idx,), d.values.detach()).view(8, 64)
    tol = {"rtol": 2e-2, "atol": 5e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    g2 = g.float().reshape(-1, 8)
    torch.testing.assert_close(side.float(), x.detach() @ s.t(), **tol)
    torch.testing.assert_close(x.grad, (g2 @ s).view(x.shape), **tol)
    want = (g2.t() @ x.detach().reshape(-1, 64)).view(-1)[idx]
    torch.testing.assert_close(d.values.grad, want, **tol)
    assert d.values.grad.dtype == torch.float32 and x.grad.dtype == x.dtype


def test_importance_hook_gives_the_weight_gradient():
    """The gradient importance of a quantized layer is built from hooks: on a plain layer the
    same hook must give exactly autograd's weight gradient."""
    from slimtune.methods.importance import _weight_gradient_hook

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    got = []
    h = lin.register_forward_hook(_weight_gradient_hook(got.append))
    x = torch.randn(3, 2, 6)
    lin(x).pow(2).sum().backward()
    h.remove()
    torch.testing.assert_close(got[0], lin.weight.grad)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_sparse_trained_on_a_quantized_base_applies_to_both_bases(
    tiny_dir, intent_file, tmp_path, kind
):
    from slimtune.delta import apply_delta

    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "q",
        method="sparse",
        quantize=kind,
        lr=5e-2,
        method_options={"density": 0.05, "importance": "fisher"},
    )
    folder = res.output_dir / "delta"
    assert res.manifest["training"]["quantize"] == kind
    plain = load_model(str(tiny_dir))
    fp = fingerprint(plain.model)
    assert res.manifest["base"]["fingerprint"] == fp
    stored = load_file(str(folder / SPARSE_FILE))
    assert any(v.abs().max() > 0 for k, v in stored.items() if k.endswith(".values"))

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    # the full-precision base: merged, W[idx] += values, removed bit for bit
    before = {n: p.clone() for n, p in plain.model.named_parameters()}
    base_logits = plain.model(ids).logits
    applied = apply_delta(plain.model, folder, fp)
    assert applied.merged
    assert not torch.allclose(applied.model(ids).logits, base_logits)
    restored = applied.remove()
    assert all(torch.equal(before[n], p) for n, p in restored.named_parameters())

    # the quantized base: beside the weights, unmerged; a merge is refused
    qbase = load_model(str(tiny_dir), quantize=kind)
    q_logits = qbase.model(ids).logits
    with pytest.raises(Exception, match="cannot be merged into a quantized base"):
        apply_delta(qbase.model, folder, fp, merge=True)
    applied = apply_delta(qbase.model, folder, fp)
    assert not applied.merged
    with torch.no_grad():
        on_q = applied.model(ids).logits
    assert not torch.allclose(on_q, q_logits)
    # the delta moves the quantized model's logits as it moves the full model's
    moved_full = apply_delta(plain.model, folder, fp)
    with torch.no_grad():
        d_full = moved_full.model(ids).logits - base_logits
    moved_full.remove()
    cos = torch.nn.functional.cosine_similarity(
        (on_q - q_logits).flatten(), d_full.flatten(), dim=0
    )
    assert cos > 0.9
    back = applied.remove()
    assert not any(hasattr(m, "sparse_delta") for m in back.modules())
    torch.testing.assert_close(back(ids).logits, q_logits)


def test_cli_quantize_errors_and_analyze_on_a_quantized_base(
    tiny_dir, intent_file, tmp_path, capsys
):
    import json

    from slimtune.cli import main

    code = main(["train", "--data", str(intent_file), "--model", str(tiny_dir), "--quantize",
                 "int4", "--output-dir", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == UserInputError.exit_code
    assert any("quantize must be one of none, nf4, int8" in line for line in err)
    assert not (tmp_path / "r").exists()  # refused before anything was written
    out = tmp_path / "a"
    code = main(["analyze", "--data", str(intent_file), "--model", str(tiny_dir), "--device",
                 "cpu", "--quantize", "nf4", "--max-examples", "8", "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    a = json.loads((out / "analysis.json").read_text())
    assert 0 <= a["freeze_below"] <= 4 and a["quantize"] == "nf4"
