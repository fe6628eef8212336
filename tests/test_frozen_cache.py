import pytest
import torch
from safetensors.torch import load_file

from slimtune.data import collate
from slimtune.errors import UserInputError
from slimtune.methods import get_method
from slimtune.model.anatomy import decoder_layers
from slimtune.model.loading import load_model
from slimtune.salf import frozen_cache
from slimtune.salf.freezing import freeze_below, frozen_layer_count, unfreeze_all
from slimtune.salf.frozen_cache import FrozenOutputCache, expected_bytes
from slimtune.testing import ARCHITECTURES, tiny_model_dir
from slimtune.training.config import TrainConfig
from slimtune.training.parallel import StepLoss

from .conftest import train_tiny


class _Ex:
    def __init__(self, ids):
        self.input_ids, self.labels = ids, ids


def _examples(vocab: int, lengths=(9, 5, 12, 7)):
    g = torch.Generator().manual_seed(1)
    return [_Ex(torch.randint(3, vocab, (n,), generator=g).tolist()) for n in lengths]


def _frozen_lora(model, k):
    n = len(decoder_layers(model))
    model = get_method("lora", {"dropout": 0.0}).prepare(model, list(range(k, n)))
    freeze_below(model, k)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not zero: every adapter weight gets a gradient
            p.data = 0.1 * torch.randn(p.shape, generator=g).to(p.device)
    return model


def _loss_and_grads(step: StepLoss, batch):
    loss, _ = step(batch)
    loss.backward()
    params = [p for p in step.model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", *ARCHITECTURES])
def test_a_cached_batch_skips_the_frozen_layers_and_trains_as_the_full_forward(tmp_path, arch):
    """Layer-index-aware models (Gemma 3's sliding/global layers) and tuple-returning
    layers included: the top layers see the states the frozen ones would hand them."""
    loaded = load_model(str(tiny_model_dir(tmp_path / "m", arch=arch, layers=4)))
    k = 2
    model = _frozen_lora(loaded.model, k)
    model.train()
    cache = FrozenOutputCache(model, k)
    step = StepLoss(model, frozen_cache=cache)
    plain = StepLoss(model)
    ex = _examples(len(loaded.tokenizer))
    pad = loaded.tokenizer.pad_token_id
    runs = {"n": 0}
    hook = decoder_layers(model)[0].mlp.register_forward_hook(
        lambda *a: runs.__setitem__("n", runs["n"] + 1)
    )

    fill = {**collate([ex[0], ex[1], ex[2]], pad), "example_ids": [0, 1, 2]}
    _loss_and_grads(step, fill)
    assert (cache.computed, cache.served, len(cache.rows), runs["n"]) == (1, 0, 3, 1)
    assert cache.bytes == sum(r.numel() * r.element_size() for r in cache.rows.values())

    # the same examples in another order, padded to another width: served from the cache
    rows = [ex[1], ex[0]]
    served = {**collate(rows, pad), "example_ids": [1, 0]}
    got = _loss_and_grads(step, served)
    assert (cache.served, runs["n"]) == (1, 1), "the frozen layers ran on a cached batch"
    want = _loss_and_grads(plain, collate(rows, pad))
    assert runs["n"] == 2  # a batch without example ids runs the layers
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # one example not yet kept: the whole batch runs the layers and keeps the new one
    _loss_and_grads(step, {**collate([ex[3], ex[0]], pad), "example_ids": [3, 0]})
    assert (cache.computed, len(cache.rows), runs["n"]) == (2, 4, 3)
    assert cache.bytes == expected_bytes(model, [len(e.input_ids) for e in ex])  # the estimate
    hook.remove()


def test_the_cache_keeps_the_frozen_mark_and_closing_it_restores_the_layers(tiny):
    model = _frozen_lora(tiny.model, 2)
    before = decoder_layers(model)[0].__dict__["forward"]
    cache = FrozenOutputCache(model, 2)
    assert decoder_layers(model)[0].__dict__["forward"] is not before
    assert frozen_layer_count(model) == 2
    cache.rows[0] = torch.zeros(3, 4)
    cache.close()
    assert decoder_layers(model)[0].__dict__["forward"] is before and not cache.rows
    assert frozen_layer_count(model) == 2
    FrozenOutputCache(model, 2)
    unfreeze_all(model)
    assert frozen_layer_count(model) == 0
    with pytest.raises(ValueError, match="not frozen"):
        FrozenOutputCache(model, 2)


def test_the_frozen_layers_fill_the_cache_in_eval_mode(tiny):
    """Dropout below the cut would otherwise fix one random draw per example."""
    model = _frozen_lora(tiny.model, 2)
    model.train()
    cache = FrozenOutputCache(model, 2)
    modes = []
    for layer in decoder_layers(model)[:2]:
        layer.mlp.register_forward_hook(lambda m, *a: modes.append(m.training))
    ex = _examples(len(tiny.tokenizer))
    StepLoss(model, frozen_cache=cache)({**collate(ex[:2], 0), "example_ids": [0, 1]})
    assert modes == [False, False]
    assert all(layer.training for layer in decoder_layers(model))  # restored after


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_with_the_cache_matches_train_without_it(
    tiny_dir, intent_file, tmp_path, checkpointing
):
    """Three epochs of 36 examples at batch 4 (9 micro-batches each): from the second
    epoch on every batch is served from the cache; after the run the model's frozen
    layers have their uncached forward back. With gradient checkpointing too: the trained
    layers above the cut recompute from served states (freeze_below leaves the frozen
    ones unchecked, under no_grad)."""
    runs = {}
    for cached in (False, True):
        runs[cached] = train_tiny(
            tiny_dir,
            intent_file,
            tmp_path / f"run{cached}",
            freeze_below=2,
            cache_frozen=cached,
            max_steps=27,
            eval_fraction=0.25,
            gradient_checkpointing=checkpointing,
        )
    with_cache, without = runs[True], runs[False]
    report = with_cache.summary["frozen_cache"]
    assert report["examples"] == 36 and report["freeze_below"] == 2
    assert (report["computed"], report["served"]) == (9, 18)
    assert "frozen_cache" not in without.summary
    for a, b in zip(with_cache.history, without.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    wa = load_file(with_cache.delta_dir / "adapter_model.safetensors")
    wb = load_file(without.delta_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5)
    assert with_cache.summary["eval_loss"] == pytest.approx(without.summary["eval_loss"], rel=1e-4)
    for layer in decoder_layers(with_cache.model)[:2]:  # freeze_below's wrapper, no cache's
        assert getattr(layer.__dict__["forward"].__wrapped__, "__self__", None) is layer


def test_the_range_test_fills_the_cache_but_the_counts_are_the_runs(
    tiny_dir, intent_file, tmp_path
):
    res = train_tiny(
        tiny_dir, intent_file, tmp_path / "run", freeze_below=2, cache_frozen=True, lr="auto"
    )
    report = res.summary["frozen_cache"]
    assert report["served"] + report["computed"] == 6  # the run's steps, not the probe's
    assert report["served"] > 0  # the range test's steps had seen those batches


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["device", "host"])
def test_kept_states_are_served_from_where_they_are_kept(tiny, device, where):
    """On a GPU (this runs there in benchmarks/gpu_frozen_cache_train.sh): kept on the
    device, or in host memory and copied up; the device named without an index too."""
    model = _frozen_lora(tiny.model.to(device), 2)
    model.train()
    store = torch.device(device) if where == "device" else torch.device("cpu")
    cache = FrozenOutputCache(model, 2, store)
    ex = _examples(len(tiny.tokenizer))
    batch = {k: v.to(device) for k, v in collate(ex[:3], 0).items()}
    StepLoss(model, frozen_cache=cache)({**batch, "example_ids": [0, 1, 2]})
    assert {r.device for r in cache.rows.values()} == {cache.store}
    assert cache.store.type == store.type  # a GPU store with its index: cuda:0, not cuda
    assert cache.store.type == "cpu" or cache.store.index is not None
    reordered = collate([ex[2], ex[0], ex[1]], 0)
    served_batch = {**{k: v.to(device) for k, v in reordered.items()}, "example_ids": [2, 0, 1]}
    got, _ = StepLoss(model, frozen_cache=cache)(served_batch)
    want, _ = StepLoss(model)({k: v for k, v in served_batch.items() if k != "example_ids"})
    assert cache.served == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_by_default_a_frozen_run_caches_from_twice_over_its_data_where_it_fits(
    tiny_dir, intent_file, tmp_path, monkeypatch
):
    from slimtune.training import trainer as trainer_module

    said: list[str] = []
    monkeypatch.setattr(trainer_module, "info", said.append)

    def cached(**overrides) -> bool:
        said.clear()
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a Trainer locks its folder
        opts = dict(model=str(tiny_dir), data=str(intent_file), output_dir=str(out), lr=1e-2)
        opts |= dict(eval_fraction=0.25, progress=False, device="cpu", save_every=0)
        t = trainer_module.Trainer(TrainConfig(**opts, **overrides))  # setup decides
        on = t.frozen_cache is not None
        t.close()
        return on

    # 36 training examples at batch 4: 18 steps see them twice, 17 not quite
    assert cached(freeze_below=2, max_steps=18, batch_size=4)
    (line,) = [s for s in said if s.startswith("--cache-frozen:")]
    assert "layers 0-1" in line and "2.0 times" in line and "--no-cache-frozen" in line
    assert not cached(freeze_below=2, max_steps=17, batch_size=4)
    assert cached(freeze_below=2, max_steps=9, batch_size=4, grad_accum=2)
    assert not cached(freeze_below=0, max_steps=18, batch_size=4)
    assert not cached(freeze_below=2, max_steps=18, batch_size=4, cache_frozen=False)
    assert cached(freeze_below=2, max_steps=17, batch_size=4, cache_frozen=True)

    class Host:  # the cache would take a third of the available memory
        available = 3000

    monkeypatch.setattr(trainer_module, "expected_bytes", lambda model, lengths: 1000)
    monkeypatch.setattr(frozen_cache.psutil, "virtual_memory", lambda: Host)
    # by default at most a quarter (the memory is read before the cache fills): a note
    assert not cached(freeze_below=2, max_steps=18, batch_size=4)
    assert any("not cached" in s and "25% of this host's available memory" in s for s in said)
    assert cached(freeze_below=2, max_steps=18, batch_size=4, cache_frozen=True)  # up to half


def test_a_resumed_run_makes_the_uninterrupted_runs_choice(tiny_dir, intent_file, tmp_path):
    """27 steps see the data three times; resumed at step 19 the 8 steps left see it less
    than twice, but the cache stays on: it runs the frozen layers in eval mode, and the
    resumed run must end with the uninterrupted run's weights."""
    from slimtune.training.trainer import Trainer

    from .test_train import stop_after_checkpoint, tiny_cfg

    opts = dict(freeze_below=2, max_steps=27, save_every=19)
    stop_after_checkpoint(tiny_cfg(tiny_dir, intent_file, tmp_path, **opts), 19)
    resumed = Trainer(tiny_cfg(tiny_dir, intent_file, tmp_path, resume=True, **opts))
    try:
        assert resumed.step == 19 and resumed.frozen_cache is not None
    finally:
        resumed.close()


@pytest.mark.parametrize("max_steps, cached", [(8, False), (24, True)])
def test_the_budget_message_shows_a_cached_step_only_for_a_run_that_caches(
    tiny_dir, intent_file, tmp_path, monkeypatch, max_steps, cached
):
    """--freeze auto with a budget names the cut's estimate; its cached step only where
    the run will keep the frozen layers' output (36 examples at batch 4: 18 steps or more)."""
    from slimtune.salf import plan
    from slimtune.training import trainer as trainer_module

    from .test_train import tiny_cfg

    said: list[str] = []
    monkeypatch.setattr(trainer_module, "info", said.append)
    monkeypatch.setattr(plan, "budget_freeze_below", lambda costs, **budget: 2)  # a cut
    opts = dict(freeze="auto", budget_step_time="100s", max_steps=max_steps, batch_size=4)
    t = trainer_module.Trainer(tiny_cfg(tiny_dir, intent_file, tmp_path, **opts))
    try:
        (line,) = [s for s in said if s.startswith("budget policy")]
        assert "freeze-below 2" in line
        assert ("once the frozen layers' output is cached" in line) is cached
        assert (t.frozen_cache is not None) is cached
    finally:
        t.close()


def test_the_flag_and_its_yaml_keys_say_on_off_or_auto(tmp_path):
    from slimtune.cli.app import build_parser, train_config_from_args

    def parsed(*flags: str, yaml: str | None = None):
        args = ["train", "--data", "a.jsonl", "--freeze-below", "2", *flags]
        if yaml is not None:
            (tmp_path / "c.yaml").write_text(yaml)
            args += ["--config", str(tmp_path / "c.yaml")]
        return train_config_from_args(build_parser().parse_args(args)).cache_frozen

    assert parsed() == "auto"
    assert parsed("--cache-frozen") is True
    assert parsed("--no-cache-frozen") is False
    assert parsed(yaml="cache_frozen: false\n") is False
    assert parsed(yaml="no_cache_frozen: true\n") is False
    assert parsed(yaml="cache_frozen: auto\n") == "auto"
    assert parsed("--cache-frozen", yaml="cache_frozen: false\n") is True  # the flag wins
    with pytest.raises(UserInputError, match="cache_frozen"):
        parsed(yaml="cache_frozen: sometimes\n")


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "needs --freeze-below K or --freeze auto"),
        ({"freeze_below": 2, "fsdp": True}, "--cache-frozen with --fsdp"),
    ],
)
def test_the_cache_is_refused_where_it_cannot_serve(options, message):
    with pytest.raises(UserInputError, match=message):
        TrainConfig(data="a.jsonl", cache_frozen=True, **options).validated()


def test_a_cache_larger_than_the_host_allows_is_refused_before_training(
    tiny_dir, intent_file, tmp_path, monkeypatch
):
    class Tight:
        available = 1000

    monkeypatch.setattr(frozen_cache.psutil, "virtual_memory", lambda: Tight)
    with pytest.raises(UserInputError, match=r"--cache-frozen: .* GiB of host memory"):
        train_tiny(tiny_dir, intent_file, tmp_path / "run", freeze_below=2, cache_frozen=True)
    assert not (tmp_path / "run" / "delta").exists()
