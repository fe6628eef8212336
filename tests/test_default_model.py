"""Tests on the real embedded default model (SmolLM2-135M-Instruct); CI runs them."""

import pytest
import torch

from slimtune.data import load_dataset
from slimtune.eval.evaluate import eval_loss, generate
from slimtune.model.loading import DEFAULT_MODEL_NAME, default_model_dir, fingerprint, load_model
from slimtune.training.config import TrainConfig
from slimtune.training.trainer import train

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default():
    return load_model("default")


def test_default_model_is_cached_and_answers_sensibly(default):
    assert (default_model_dir() / "model.safetensors").exists()
    assert default.name == DEFAULT_MODEL_NAME and default.num_layers == 30
    tok = default.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    answer = generate(default.model, tok, [prompt], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_fingerprint_is_stable_across_loads(default):
    again = load_model("default")
    assert fingerprint(again.model) == fingerprint(default.model)


def test_a_few_lora_steps_lower_the_loss_on_the_bundled_task(tmp_path):
    loaded = load_model("default")
    ds = load_dataset("builtin:support_intents_train", loaded.tokenizer)
    probe = ds.examples[:16]
    pad = loaded.tokenizer.pad_token_id
    before = eval_loss(loaded.model, probe, pad)["loss"]
    torch.manual_seed(0)
    res = train(
        TrainConfig(
            data="builtin:support_intents_train",
            max_steps=6,
            batch_size=4,
            lr=1e-3,
            output_dir=str(tmp_path / "run"),
            progress=False,
            device="cpu",
            eval_fraction=0.02,
        ),
        loaded=loaded,
    )
    after = eval_loss(res.model, probe, pad)["loss"]
    assert after < 0.5 * before, (before, after)
    assert res.manifest["base"]["name"] == DEFAULT_MODEL_NAME


def test_expert_adapters_on_the_default_model_decode_like_a_full_forward():
    """Routing with a KV cache (one new token at a time, left-padded batch) gives the
    logits a full forward gives; fresh experts (B = 0) leave the model's answer alone."""
    from slimtune.methods import get_method
    from slimtune.methods.experts import attached

    loaded = load_model("default")
    tok, model = loaded.tokenizer, loaded.model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    experts = get_method("experts", {"experts": 8, "top_k": 2, "rank": 8})
    experts.prepare(model, list(range(15, 30)))
    model.eval()
    assert "Paris" in generate(model, tok, [prompt], max_new_tokens=12)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in attached(model).linears.values():
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=gen) * 0.02)
    batch = tok([prompt, "Hello"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seq = out.sequences
        new = torch.ones_like(seq[:, batch["input_ids"].shape[1] :])
        mask = torch.cat([batch["attention_mask"], new], 1)
        full = model(input_ids=seq, attention_mask=mask).logits
    n = batch["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        assert torch.allclose(logits, full[:, n - 1 + step], atol=2e-3, rtol=1e-3), step
    attached(model).remove()  # the experts did something, and they come off
    with torch.no_grad():
        base = model(input_ids=seq, attention_mask=mask).logits
    assert (base - full)[mask.bool()].abs().max() > 0.05
