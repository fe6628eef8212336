import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from slimtune.data import collate, load_dataset
from slimtune.eval.evaluate import classification_accuracy, detect_task, eval_loss, score_labels
from slimtune.training import loss as lm

from .conftest import intent_rows, train_tiny, write_jsonl


def naive_label_logprob(model, tok, prompt: str, label: str) -> float:
    """One full forward pass per (prompt, label): the definition the fast path must match."""
    p = tok(prompt)["input_ids"]
    c = tok(label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))


def test_shared_prefix_scoring_equals_one_pass_per_label(tiny):
    model, tok = tiny.model, tiny.tokenizer
    prompts = [
        "Message: short\nIntent:",
        "Message: a much longer message about a parcel\nIntent:",
        "hi",
    ]
    labels = [" billing", " shipping", " returns label box"]  # different token lengths
    fast = score_labels(model, tok, prompts, labels, batch_size=2)
    slow = torch.tensor(
        [[naive_label_logprob(model, tok, p, lab) for lab in labels] for p in prompts]
    )
    assert fast.shape == (3, 3)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


@contextlib.contextmanager
def forward_widths(model):
    """The token width of every forward of ``model`` inside the block, in order."""
    widths: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[-1])
    )
    try:
        yield widths
    finally:
        hook.remove()


@pytest.mark.parametrize("max_length", [None, 24])
def test_prompts_that_share_an_instruction_run_it_once_and_score_as_alone(tiny, max_length):
    """The instruction every prompt starts with runs once for the set, batches go by length;
    each score is the one its prompt gets alone. With a ``max_length`` that cuts the
    instruction the prompts share less (their ends are kept), and still score as alone."""
    model, tok = tiny.model, tiny.tokenizer
    head = "Classify the customer message into one of: billing, shipping.\nMessage: "
    messages = ["a", "where is my parcel now, it is late", "refund", "my card was charged twice"]
    prompts = [head + msg + "\nIntent:" for msg in messages]
    labels = [" billing", " shipping label"]
    with forward_widths(model) as widths:
        fast = score_labels(model, tok, prompts, labels, batch_size=3, max_length=max_length)
    alone = torch.cat(
        [score_labels(model, tok, [p], labels, max_length=max_length) for p in prompts]
    )
    torch.testing.assert_close(fast, alone, atol=1e-4, rtol=1e-4)
    if max_length is None:  # the head ran once; no later forward is as wide as a whole prompt
        head_len = len(tok(head)["input_ids"]) - 1  # its last token may merge with the next
        assert widths[0] >= head_len
        assert max(widths[1:]) <= max(len(tok(p)["input_ids"]) for p in prompts) - head_len


@pytest.mark.parametrize("window", [8, 512])
def test_a_sliding_window_model_scores_batched_prompts_as_alone(tmp_path, window):
    """A sliding window counts cache slots: padding after a shared prefix would push real
    tokens out of a small one, so the prefix is shared only where every prompt and its
    label fit in the window (Gemma 3's is 512 on the packaged model)."""
    from slimtune.model.loading import load_model
    from slimtune.testing import tiny_model_dir

    tiny = load_model(str(tiny_model_dir(tmp_path / "g", layers=2, arch="gemma3")))
    tiny.model.config.sliding_window = window
    tiny.model.config.layer_types = ["sliding_attention"] * 2
    head = "Classify the customer message into one of: billing, shipping.\nMessage: "
    prompts = [head + m + "\nIntent:" for m in ("a", "where is my parcel now, it is late")]
    with forward_widths(tiny.model) as widths:
        fast = score_labels(tiny.model, tiny.tokenizer, prompts, [" billing", " shipping"])
    alone = torch.cat(
        [score_labels(tiny.model, tiny.tokenizer, [p], [" billing", " shipping"]) for p in prompts]
    )
    torch.testing.assert_close(fast, alone, atol=1e-4, rtol=1e-4)
    longest = max(len(tiny.tokenizer(p)["input_ids"]) for p in prompts)
    assert (max(widths) < longest) is (window == 512)  # shared only where it is exact


def test_generation_runs_a_shared_instruction_once_and_answers_as_alone(tiny):
    """Greedy answers of prompts that share an instruction: the instruction runs once, each
    batch generates after it (padding between), and every answer is the one its prompt
    gets alone, in the order asked."""
    from slimtune.eval.evaluate import generate

    model, tok = tiny.model, tiny.tokenizer
    with torch.no_grad():  # larger random weights: answers that depend on the prompt
        for w in model.parameters():
            w.mul_(4.0)
    head = (  # longer than any message, so a forward as wide is the instruction's
        "Extract the order number and the product from the customer message. Answer as "
        "<order number> | <product>, none for a missing one.\nMessage: "
    )
    messages = ["order 12 lamp", "where is my parcel now, it is late", "hi", "refund order 7"]
    prompts = [head + m + "\nAnswer:" for m in messages]
    head_len = len(tok(head)["input_ids"]) - 1  # its last token may merge with the next
    assert all(len(tok(m + "\nAnswer:")["input_ids"]) + 1 < head_len for m in messages)
    # a generation config asking for beams and its own cache: generation stays greedy,
    # in the shared instruction's cache
    model.generation_config.num_beams = 2
    model.generation_config.cache_implementation = "static"
    with forward_widths(model) as widths:
        together = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1  # the answers differ, so the order is checked
    assert widths[0] >= head_len  # the instruction's own forward, and no other as wide
    assert max(widths[1:]) < head_len


def test_no_prefix_is_shared_past_a_layer_that_is_not_attention(tiny):
    """A recurrent or convolution layer's state would take in the padding after a shared
    prefix; so would a window shorter than the widest prompt."""
    from slimtune.eval.evaluate import _attention_span

    cfg = tiny.model.config
    assert _attention_span(tiny.model) is None
    cfg.layer_types = ["full_attention", "linear_attention"] * 2
    assert _attention_span(tiny.model) == 0
    cfg.layer_types = ["sliding_attention"] * 4
    cfg.sliding_window = 16
    assert _attention_span(tiny.model) == 16


def test_accuracy_counts_argmax_of_scores(tiny, tmp_path):
    rows = [
        {"prompt": f"Message: {i}\nIntent:", "completion": lab}
        for i, lab in enumerate([" billing", " shipping", " billing", " shipping"])
    ]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tiny.tokenizer)
    assert detect_task(ds) == "classification"
    res = classification_accuracy(tiny.model, tiny.tokenizer, ds.records)
    scores = score_labels(tiny.model, tiny.tokenizer, [r["prompt"] for r in rows], res["labels"])
    expected = [res["labels"][i] == r["completion"] for i, r in zip(scores.argmax(-1), rows)]
    assert res["correct"] == [int(x) for x in expected]
    assert res["accuracy"] == sum(expected) / 4


def test_target_loss_matches_the_models_own_loss(tiny, intent_file):
    ds = load_dataset(intent_file, tiny.tokenizer)
    batch = collate(ds.examples[:4], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        ours, n = lm.target_loss(tiny.model, batch)
        ref = tiny.model(**batch).loss  # HF: mean over target tokens
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert float(ours) / n == pytest.approx(float(ref), rel=1e-5)
    res = eval_loss(tiny.model, ds.examples[:4], tiny.tokenizer.pad_token_id, batch_size=3)
    assert res["loss"] == pytest.approx(float(ref), rel=1e-5)


def test_chunked_head_gives_the_same_loss_and_gradients(tiny, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox " * 6}] * 3)
    batch = collate(load_dataset(path, tiny.tokenizer).examples, tiny.tokenizer.pad_token_id)
    head = tiny.model.get_output_embeddings().weight

    def loss_and_grad():
        head.grad = None
        loss, _ = lm.target_loss(tiny.model, batch)
        loss.backward()
        return float(loss.detach()), head.grad.clone()

    whole = loss_and_grad()
    monkeypatch.setattr(lm, "CHUNK_ROWS", 16)
    chunked = loss_and_grad()
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-5, rtol=1e-4)


def test_detect_task(tiny, tmp_path):
    gen = write_jsonl(
        tmp_path / "g.jsonl", [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(6)]
    )
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    assert detect_task(load_dataset(gen, tiny.tokenizer)) == "generation"
    assert detect_task(load_dataset(text, tiny.tokenizer)) == "lm"


def test_cross_entropy_reference_is_what_we_think():
    # guard for the definition used above: HF's loss is the token mean of next-token CE
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4]])
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    from transformers.loss.loss_utils import ForCausalLMLoss

    assert float(ForCausalLMLoss(logits, labels, vocab_size=7)) == pytest.approx(float(ref))


def test_classification_loss_from_scores_equals_the_eval_loss(tiny, intent_file):
    from slimtune.eval.evaluate import evaluate

    ds = load_dataset(intent_file, tiny.tokenizer)
    metrics, details = evaluate(tiny.model, tiny.tokenizer, ds, latency=False)
    assert metrics["task"] == "classification" and details["gold_loss"] is not None
    direct = eval_loss(tiny.model, ds.examples, tiny.tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(direct["loss"], rel=1e-4)
    assert metrics["target_tokens"] == direct["target_tokens"]


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_chunked_cross_entropy_matches_autograd(autocast):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (50,))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    ref.backward(torch.tensor(0.5))
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with ctx:
        ours = lm.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 7)
    ours.backward(torch.tensor(0.5))
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-4}
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=tol["rtol"])
    torch.testing.assert_close(hidden.grad, ref_grads[0], **tol)
    torch.testing.assert_close(weight.grad, ref_grads[1], **tol)
    # frozen head: no weight gradient is computed or returned
    hidden.grad = None
    frozen = weight.detach()
    lm.ChunkedLinearCrossEntropy.apply(hidden, frozen, targets, 7).backward()
    assert hidden.grad is not None


def test_per_example_loss_matches_the_token_weighted_eval_loss(tiny, intent_file):
    from slimtune.eval.evaluate import per_example_loss

    ds = load_dataset(intent_file, tiny.tokenizer)
    exs = ds.examples[:6]
    per = per_example_loss(tiny.model, exs, tiny.tokenizer.pad_token_id)
    weights = [e.num_target_tokens for e in exs]
    pooled = sum(p * w for p, w in zip(per, weights)) / sum(weights)
    assert len(per) == 6 and len(set(per)) > 1
    assert pooled == pytest.approx(
        eval_loss(tiny.model, exs, tiny.tokenizer.pad_token_id)["loss"], rel=1e-4
    )


class CountingTokenizer:
    """Delegates to a tokenizer and records the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self._tok(text, **kwargs)


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_a_100k_word_prompt_is_cut_to_max_length_keeping_its_end(tiny, tmp_path, task):
    from slimtune.data import CHARS_PER_TOKEN
    from slimtune.eval.evaluate import evaluate

    tail = "\nMessage: parcel\nIntent:"
    rows = [
        {"prompt": "word " * 100_000 + tail, "completion": " billing"},
        {"prompt": "Message: card" + tail, "completion": " shipping"},
    ]
    tok = CountingTokenizer(tiny.tokenizer)
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=64)
    widths, firsts = [], []

    def record(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(ids.shape[1])
        firsts.append(ids[0].tolist())

    handle = tiny.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        metrics, _ = evaluate(tiny.model, tok, ds, task=task, batch_size=2, max_new_tokens=8)
    finally:
        handle.remove()
    assert metrics["task"] == task and metrics["examples"] == 2
    assert widths and max(widths) <= 64
    assert tok.longest <= 64 * CHARS_PER_TOKEN
    # the first pass over the huge prompt ends with the prompt's own end
    end = tiny.tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert firsts[0][-len(end) :] == end


def test_no_progress_silences_every_bar_and_progress_shows_the_eval(
    tiny_dir, intent_file, tmp_path, capfd
):
    from .conftest import train_tiny

    opts = dict(method="sparse", max_steps=1, method_options={"density": 0.05})
    train_tiny(tiny_dir, intent_file, tmp_path / "quiet", progress=False, **opts)
    err = capfd.readouterr().err
    assert "importance" not in err and "eval" not in err and "%|" not in err
    train_tiny(tiny_dir, intent_file, tmp_path / "loud", progress=True, **opts)
    err = capfd.readouterr().err
    for bar in ("importance (fisher)", "eval classification", "eval latency"):
        assert bar in err


def test_conversational_prompt_completion_evaluates_as_a_chat(tiny, tmp_path):
    from slimtune.eval.evaluate import evaluate

    chat = [{"role": "user", "content": "hello"}]
    rows = [
        {"prompt": chat, "completion": [{"role": "assistant", "content": f"answer {i}"}]}
        for i in range(3)
    ]
    ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", rows), tiny.tokenizer)
    metrics, details = evaluate(tiny.model, tiny.tokenizer, ds)  # the prompt is a list
    assert metrics["task"] == "chat" and metrics["latency_p50_ms"] > 0
    assert details["references"] == ["answer 0", "answer 1", "answer 2"]


def test_chats_are_scored_by_generating_their_last_assistant_turn(tiny, tmp_path):
    """The context is every turn before the last assistant one (an earlier answer among
    them), rendered by the chat template; the score compares the generated turn."""
    from slimtune.eval.evaluate import evaluate, exact_match

    tok = tiny.tokenizer
    turns = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "where is my parcel"},
    ]
    rows = [{"messages": [*turns, {"role": "assistant", "content": "in transit"}]}]
    ds = load_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tok)
    first = exact_match(tiny.model, tok, ds.records, chat=True, max_new_tokens=6)
    prompt = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = tiny.model.generate(
            input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert first["predictions"] == [tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)]
    assert first["references"] == ["in transit"] and first["exact_match"] == 0.0
    # the model's own answer as the reference: an exact match
    said = first["predictions"][0]
    rows = [{"messages": [*turns, {"role": "assistant", "content": said}]}]
    ds = load_dataset(write_jsonl(tmp_path / "b.jsonl", rows), tok)
    metrics, details = evaluate(tiny.model, tok, ds, max_new_tokens=6, latency=False)
    assert metrics["task"] == "chat" and details["predictions"] == [said]
    assert metrics["exact_match"] == metrics["normalized_match"] == 1.0


def test_a_normalized_match_forgives_case_punctuation_and_articles():
    from slimtune.eval.evaluate import _scored, normalize_answer

    assert normalize_answer("The  Paris.") == normalize_answer("paris") == "paris"
    r = _scored(["Paris.", "in transit", "Lyon"], ["paris", "In transit!", "Paris"])
    assert r["correct"] == [0, 0, 0] and r["normalized"] == [1, 1, 0]
    assert (r["exact_match"], round(r["normalized_match"], 3)) == (0.0, 0.667)


def test_a_chat_run_reports_its_matches_and_samples_beside_references(tiny_dir, tmp_path):
    from slimtune.cli.app import main

    rows = [
        {"messages": [{"role": "user", "content": f"code {i}?"},
                      {"role": "assistant", "content": f"it is {i % 3}"}]}
        for i in range(24)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--max-steps", "2"]
    args += ["--batch-size", "4", "--no-progress", "--no-store", "--output-dir", str(out)]
    assert main([*args, "--eval-fraction", "0.25"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "chat"
    assert 0 <= summary["eval_exact_match"] <= summary["eval_normalized_match"] <= 1
    report = (out / "report.md").read_text()
    assert "normalized match" in report and "generated | reference" in report
    assert "'it is " in report  # a reference beside its generated answer


def test_a_chat_turn_ends_at_the_templates_end_of_turn_even_when_eos_is_another(tiny):
    """A base model's config may name <|endoftext|> as its end; its chat template closes an
    assistant turn with <|im_end|>: generation must stop there too."""
    from slimtune.eval.evaluate import _end_tokens

    tok = tiny.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    tok.eos_token = "<|endoftext|>"
    tiny.model.generation_config.eos_token_id = endoftext
    assert _end_tokens(tiny.model, tok) == [endoftext, im_end]
    tok.chat_template = None  # no template: the configured end only
    assert _end_tokens(tiny.model, tok) == [endoftext]


def test_one_line_answers_are_read_from_the_first_line_only(tiny, tmp_path, monkeypatch):
    """A model that has not learnt where an answer ends writes on after a line break
    (zero-shot, every answer missed); with one-line references only the first line counts,
    and a multi-line reference keeps the whole output."""
    from slimtune.eval import evaluate as ev

    said = [" 2559718 | Apple Watch SE\n\nThe answer is above.", "none | Kindle\nMore"]
    monkeypatch.setattr(ev, "generate_ids", lambda *a, **k: list(said))
    rows = [
        {"prompt": "Extract: order 2559718, apple wach se\nAnswer:", "completion": " 2559718 | Apple Watch SE"},
        {"prompt": "Extract: my kindle\nAnswer:", "completion": " none | Kindle"},
    ]  # fmt: skip
    ds = load_dataset(write_jsonl(tmp_path / "one.jsonl", rows), tiny.tokenizer)
    got = ev.exact_match(tiny.model, tiny.tokenizer, ds.records)
    assert got["predictions"] == [" 2559718 | Apple Watch SE", "none | Kindle"]
    assert got["exact_match"] == 1.0
    rows[1]["completion"] = " none\n| Kindle"  # decided per record: this one keeps every line
    ds = load_dataset(write_jsonl(tmp_path / "two.jsonl", rows), tiny.tokenizer)
    got = ev.exact_match(tiny.model, tiny.tokenizer, ds.records)
    assert got["predictions"] == [" 2559718 | Apple Watch SE", said[1]]
    assert got["correct"] == [1, 0]


def faulty_sdpa(monkeypatch):
    """SDPA as torch's memory-efficient CUDA kernel can behave: NaN out of every query row
    that attends to no key (a left-padded batch's pad rows, under transformers' stock mask)."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, *args, **kwargs):
        out = real(q, k, v, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1, keepdim=True)  # [b, 1|h, q, 1]
            out = out.masked_fill(empty.expand(*out.shape[:-1], 1), float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("guarded", [True, False])
def test_left_padded_scoring_survives_a_kernel_that_fails_on_empty_rows(tiny, monkeypatch, guarded):
    from slimtune.eval.evaluate import generate

    model, tok = tiny.model, tiny.tokenizer
    prompts = ["hi", "Message: a much longer message about a parcel\nIntent:", "Message: ok"]
    labels = [" billing", " shipping", " returns label box"]
    one = score_labels(model, tok, prompts, labels, batch_size=1)  # no padding at all
    texts = generate(model, tok, prompts, max_new_tokens=4, batch_size=1)
    faulty_sdpa(monkeypatch)
    if not guarded:  # transformers' own masks: the fault reaches the real rows
        from slimtune.model import masks

        monkeypatch.setattr(masks, "attend_somewhere", lambda mask: mask)
    padded = score_labels(model, tok, prompts, labels, batch_size=3)
    if not guarded:
        assert padded.isnan().any()
        return
    torch.testing.assert_close(padded, one, atol=1e-4, rtol=1e-4)
    assert generate(model, tok, prompts, max_new_tokens=4, batch_size=3) == texts


def test_the_mask_guard_opens_only_rows_that_attend_to_nothing_and_only_for_inference():
    from transformers.masking_utils import AttentionMaskInterface

    from slimtune.model.masks import attend_somewhere, install_mask_guard, padded_inference

    m = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    m = m.view(1, 1, 3, 3)
    out = attend_somewhere(m)
    assert out[0, 0, 0].all() and torch.equal(out[0, 0, 1:], m[0, 0, 1:])
    for low in (torch.finfo(torch.float32).min, float("-inf")):
        f = torch.where(m, 0.0, low)
        out = attend_somewhere(f)
        assert (out[0, 0, 0] == 0).all() and torch.equal(out[0, 0, 1:], f[0, 0, 1:])
    assert attend_somewhere(None) is None
    # transformers' builder, wrapped once: a left-padded row's first position is empty,
    # and opened only inside padded_inference (training's masks stay as built)
    assert install_mask_guard() and install_mask_guard()
    build = AttentionMaskInterface._global_mapping["sdpa"]
    assert build.slimtune_guarded and not getattr(build.stock, "slimtune_guarded", False)
    pad = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    kw = {"batch_size": 1, "q_length": 3, "kv_length": 3, "attention_mask": pad}
    assert not build(**kw)[0, 0, 0].any()
    with padded_inference("cpu"):
        assert build(**kw)[0, 0, 0].all()
        assert torch.equal(build(**kw)[0, 0, 1:], build.stock(**kw)[0, 0, 1:])
    assert not build(**kw)[0, 0, 0].any()


def test_every_left_padded_forward_runs_under_padded_inference(tiny, monkeypatch):
    from slimtune.eval import evaluate

    model, tok = tiny.model, tiny.tokenizer
    inside, calls = [False], []

    @contextlib.contextmanager
    def recorder(device):
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(evaluate, "padded_inference", recorder)
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(inside[0]))
    try:
        score_labels(model, tok, ["hi", "a longer prompt"], [" a", " b c"], batch_size=2)
        evaluate.generate(model, tok, ["hi", "a longer prompt"], max_new_tokens=3, batch_size=2)
    finally:
        hook.remove()
    assert calls and all(calls), calls


def test_padded_inference_on_cuda_keeps_the_memory_efficient_kernel_out(monkeypatch):
    import torch.nn.attention as attention

    from slimtune.model.masks import padded_inference

    held = []
    monkeypatch.setattr(
        attention, "sdpa_kernel", lambda backends: held.append(backends) or contextlib.nullcontext()
    )
    with padded_inference("cpu"):
        pass
    assert held == []  # the CPU's kernels were right
    with padded_inference("cuda:0"):
        pass
    assert held == [[attention.SDPBackend.FLASH_ATTENTION, attention.SDPBackend.MATH]]


@pytest.mark.parametrize("method", ["lora", "sparse"])
def test_the_score_train_reports_is_the_score_eval_gives_its_delta(
    tiny_dir, intent_file, tmp_path, method
):
    """train scores its eval set with the delta attached to the model it trained;
    ``slimtune eval`` loads the stored delta onto a fresh base: the same numbers (fp32 CPU),
    so a report's quality is the delta's, not the training process'."""
    from slimtune.cli.app import main

    test = write_jsonl(tmp_path / "test.jsonl", intent_rows(30)[6:])
    run = train_tiny(
        tiny_dir, intent_file, tmp_path / "r", method=method, eval_data=str(test), max_steps=8
    )
    s = run.summary
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_dir), "--data", str(test), "--delta"]
    argv += [str(run.delta_dir), "--device", "cpu", "--no-latency", "--output", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert got["examples"] == s["eval_examples"] == 24
    assert got["accuracy"] == s["eval_accuracy"]
    assert got["loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
    # ... and those numbers are the delta's: the base alone scores another loss
    base = tmp_path / "base.json"
    argv = ["eval", "--model", str(tiny_dir), "--data", str(test), "--device", "cpu"]
    assert main([*argv, "--no-latency", "--output", str(base)]) == 0
    assert abs(json.loads(base.read_text())["loss"] - got["loss"]) > 0.1


@pytest.mark.parametrize("max_seconds, rounds", [(0.0, 1), (1e9, 3)])
def test_decode_latency_times_rounds_until_its_budget_after_a_short_warm_up(
    tiny, max_seconds, rounds
):
    """A slow CPU gets one timed round (a small run's report must not outlast its training);
    a fast device every round asked for. The warm-up is a few steps, not a round."""
    from slimtune.eval.evaluate import decode_latency

    calls = []
    hook = tiny.model.register_forward_hook(lambda m, a, kw: calls.append(1))
    try:
        out = decode_latency(
            tiny.model,
            tiny.tokenizer,
            "hello",
            new_tokens=5,
            repeats=3,
            warmup_tokens=2,
            max_seconds=max_seconds,
        )
    finally:
        hook.remove()
    assert out["latency_steps"] == 5 * rounds
    assert len(calls) == (1 + 2) + rounds * (1 + 5)  # prefill + steps, warm-up then timed
    assert 0 < out["latency_p50_ms"] <= out["latency_p95_ms"]


def test_a_limit_keeps_the_whole_files_task_and_labels(tiny, tmp_path):
    """`eval --limit 2` scores the first two records against every label of the file: a
    few records hold fewer labels (chance rises) or look like generation."""
    from slimtune.errors import UserInputError
    from slimtune.eval.evaluate import first_records

    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", intent_rows(12)), tiny.tokenizer)
    few, task, labels = first_records(ds, "auto", 2)
    assert task == "classification" and labels == [" billing", " returns", " shipping"]
    assert detect_task(few) == "generation"  # what the two alone would have said
    assert [r.line for r in few.records] == [1, 2] and [e.line for e in few.examples] == [1, 2]
    assert len(ds.records) == 12  # the file's dataset is left whole
    assert first_records(ds, "auto", None)[0].records == ds.records
    with pytest.raises(UserInputError, match="--limit must be >= 1, got 0"):
        first_records(ds, "auto", 0)


def test_a_task_is_checked_against_its_name_and_the_records(tiny, tmp_path):
    from slimtune.errors import UserInputError
    from slimtune.eval.evaluate import evaluate

    text = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}]), tiny.tokenizer)
    with pytest.raises(UserInputError, match="task 'Classification': use one of auto,"):
        evaluate(tiny.model, tiny.tokenizer, text, task="Classification", latency=False)
    with pytest.raises(
        UserInputError, match=r"task classification reads prompt_completion .*t\.jsonl holds text"
    ):
        evaluate(tiny.model, tiny.tokenizer, text, task="classification", latency=False)
    with pytest.raises(UserInputError, match="batch size must be >= 1, got 0"):
        evaluate(tiny.model, tiny.tokenizer, text, batch_size=0, latency=False)


def test_answers_leave_room_for_the_prompt_under_a_short_max_length(tiny, tmp_path, monkeypatch):
    """With --max-length 32 a 64-token answer budget left every prompt one token."""
    from slimtune.eval import evaluate as ev

    rows = [{"prompt": f"Copy the word {w}:", "completion": f" {w}"} for w in "abcdef"]
    ds = load_dataset(write_jsonl(tmp_path / "g.jsonl", rows), tiny.tokenizer, max_length=32)
    seen = []

    def generate_ids(model, tokenizer, seqs, **kw):
        seen.append((max(map(len, seqs)), kw["max_new_tokens"]))
        return ["" for _ in seqs]

    monkeypatch.setattr(ev, "generate_ids", generate_ids)
    metrics, _ = ev.evaluate(tiny.model, tiny.tokenizer, ds, task="generation", latency=False)
    assert metrics["task"] == "generation"
    prompt, answer = seen[0]
    full = max(len(tiny.tokenizer(r["prompt"])["input_ids"]) for r in rows)
    assert answer == 16 and prompt == min(full, 16) > 1
