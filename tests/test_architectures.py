"""Every method, freezing and the SALF analysis on tiny random models of the common
architectures besides Llama (Qwen2, Qwen3, Gemma3, Mistral, Phi3: Phi3 fuses q/k/v and
gate/up into one linear each, Gemma3 scales its embeddings and norms differently)."""

import pytest
import torch

from slimtune.data import load_dataset
from slimtune.delta import apply_delta
from slimtune.model.loading import fingerprint, load_model
from slimtune.salf.analysis import analyze
from slimtune.testing import ARCHITECTURES, tiny_model_dir

from .conftest import train_tiny

METHODS = {
    "full": {},
    "lora": {"r": 4},
    "dora": {"r": 4},
    "sparse": {"density": 0.05},
    "rosa": {"density": 0.05, "r": 4},
    "shira": {"density": 0.05},
    "experts": {},
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_dir(request, tmp_path_factory):
    return tiny_model_dir(
        tmp_path_factory.mktemp(request.param) / "m", layers=3, arch=request.param
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_above_the_frozen_layers_and_comes_off_exactly(
    arch_dir, method, intent_file, tmp_path
):
    res = train_tiny(
        arch_dir,
        intent_file,
        tmp_path / "run",
        method=method,
        max_steps=2,
        freeze_below=1,
        method_options=METHODS[method],
    )
    assert res.manifest["layers"] == [1, 2]  # layer 0 frozen
    assert res.summary["final_train_loss"] == res.summary["final_train_loss"]  # not NaN
    base = load_model(str(arch_dir))
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    ids = torch.tensor([base.tokenizer("Message: parcel late\nIntent:")["input_ids"]])
    with torch.no_grad():
        plain = base.model.eval()(input_ids=ids).logits
        applied = apply_delta(base.model, res.delta_dir, fingerprint(base.model))
        assert not torch.allclose(applied.model.eval()(input_ids=ids).logits, plain)
    restored = applied.remove()
    after = dict(restored.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before), method


def test_the_salf_analysis_reads_every_layer(arch_dir, intent_file):
    loaded = load_model(str(arch_dir))
    a = analyze(loaded.model, load_dataset(intent_file, loaded.tokenizer), progress=False)
    assert a.num_layers == 3 and len(a.spaces) == 4
    assert a.gain[0] == 1.0 and all(x >= y for x, y in zip(a.gain, a.gain[1:]))
    assert 0 <= a.freeze_below < a.num_layers
