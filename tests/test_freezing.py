import pytest
import torch

from slimtune.errors import UserInputError
from slimtune.methods import get_method
from slimtune.model.anatomy import decoder_layers
from slimtune.salf.freezing import freeze_below, frozen_layer_count
from slimtune.training.loss import target_loss


def _batch(vocab: int, b: int = 2, t: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _layer_outputs(model):
    outs = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
        for i, layer in enumerate(decoder_layers(model))
    ]
    return outs, hooks


@pytest.mark.parametrize("method", ["full", "lora"])
def test_frozen_layers_record_no_graph_and_stay_bit_identical(tiny, method):
    k = 2
    model = get_method(method).prepare(tiny.model, list(range(k, tiny.num_layers)))
    freeze_below(model, k)
    assert frozen_layer_count(model) == k
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    outs, hooks = _layer_outputs(model)
    model.train()
    for _ in range(3):
        loss, n = target_loss(model, _batch(len(tiny.tokenizer)))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    hidden = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert all(hidden(outs[i]).grad_fn is None for i in range(k))
    assert all(hidden(outs[i]).grad_fn is not None for i in range(k, tiny.num_layers))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    for n in changed:
        assert not any(f"layers.{i}." in n for i in range(k)), n
        assert "embed_tokens" not in n


def test_no_graph_below_the_cut_even_when_inputs_require_grad(tiny):
    """peft's enable_input_require_grads would otherwise drag autograd through frozen layers."""
    model = get_method("lora").prepare(tiny.model, [3])
    model.enable_input_require_grads()
    saved = {"n": 0}

    def count(t):
        saved["n"] += 1
        return t

    def saved_tensors(k):
        freeze_below(model, k)
        saved["n"] = 0
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            target_loss(model, _batch(len(tiny.tokenizer)))
        return saved["n"]

    from slimtune.salf.freezing import unfreeze_all

    unfrozen = saved_tensors(0)
    frozen = saved_tensors(3)
    unfreeze_all(model)
    assert frozen < unfrozen / 2


def test_freeze_bounds_are_checked(tiny):
    with pytest.raises(UserInputError, match="between 0 and 4"):
        freeze_below(tiny.model, 5)
