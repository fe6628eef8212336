"""Tiny random-initialised models for tests, examples and benchmarks; no download needed.

``tiny_model_dir(path)`` writes a Llama-shaped model (a few layers, hidden size 32) and a
byte-level BPE tokenizer trained on a few sentences, with a ChatML template, so every code
path that the default model takes (tied embeddings, chat template, PEFT) runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Classify the customer message into one of: billing, shipping, returns, account, "
    "technical, product.",
    "Message: my card was charged twice for the same order, please refund the extra payment.",
    "Message: where is my parcel? the tracking number has not updated for a week.",
    "Intent: billing shipping returns account technical product",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "user assistant system hello world 0123456789",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(
    vocab_size: int, *, layers: int = 4, hidden: int = 32, seed: int = 0, tie: bool = True
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


# architectures tiny_model_dir builds besides Llama: transformers' config and model class
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def tiny_model_dir(
    path: str | Path, *, layers: int = 4, hidden: int = 32, seed: int = 0, arch: str = "llama"
) -> Path:
    """Write a tiny model folder that :func:`slimtune.model.loading.load_model` loads like
    any other; ``arch``: ``llama`` or one of :data:`ARCHITECTURES` (random weights)."""
    path = Path(path)
    tok = tiny_tokenizer()
    if arch == "llama":
        model = tiny_llama(len(tok), layers=layers, hidden=hidden, seed=seed)
    else:
        import transformers

        config_name, model_name = ARCHITECTURES[arch]
        config = getattr(transformers, config_name)(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,  # Phi3's default lies outside this vocabulary
        )
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_delta(
    folder: str | Path, seed: int, model: str = "default", *, method: str = "lora"
) -> dict:
    """A delta of ``model`` with seeded random values on the top two layers, written to
    ``folder``; returns its manifest. ``lora``: rank-4 adapters; ``sparse``: 1% of each
    weight's entries, chosen at random. Each seed answers a prompt its own way: what
    serving tests and benchmarks need, without training."""
    from .delta import save_delta
    from .methods import get_method
    from .model.loading import fingerprint, load_model

    loaded = load_model(model, device="cpu")
    base = {
        "fingerprint": fingerprint(loaded.model),
        "name": loaded.name,
        "source": loaded.source,
        "architecture": type(loaded.model).__name__,
        "num_layers": loaded.num_layers,
    }
    layers = [loaded.num_layers - 2, loaded.num_layers - 1]
    options: dict = {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "sparse": {"density": 0.01, "importance": "random", "seed": seed},
    }[method]
    m = get_method(method, options)
    with torch.random.fork_rng():  # peft's initial A: seeded too, the caller's RNG untouched
        torch.manual_seed(seed)
        wrapped = m.prepare(loaded.model, layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad and (method != "lora" or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_delta(folder, m, wrapped, base=base, layers=layers)


def random_lora_delta(folder: str | Path, seed: int, model: str = "default") -> dict:
    """:func:`random_delta` of a LoRA."""
    return random_delta(folder, seed, model)
