"""Tests on the real embedded default model (SmolLM2-135M-Instruct); CI runs them."""

import pytest
import torch

from slimtune.data import load_dataset
from slimtune.evaluation import eval_loss, generate
from slimtune.models import DEFAULT_MODEL_NAME, default_model_dir, fingerprint, load_model
from slimtune.trainer import TrainConfig, train

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default():
    return load_model("default")


def test_default_model_is_cached_and_answers_sensibly(default):
    assert (default_model_dir() / "model.safetensors").exists()
    assert default.name == DEFAULT_MODEL_NAME and default.num_layers == 30
    tok = default.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
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
    res = train(TrainConfig(data="builtin:support_intents_train", max_steps=6, batch_size=4,
                            lr=1e-3, output_dir=str(tmp_path / "run"), progress=False,
                            device="cpu", eval_fraction=0.02), loaded=loaded)
    after = eval_loss(res.model, probe, pad)["loss"]
    assert after < 0.5 * before, (before, after)
    assert res.manifest["base"]["name"] == DEFAULT_MODEL_NAME
