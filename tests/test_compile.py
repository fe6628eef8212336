"""--compile: the decoder layers run through torch.compile for training, with the same
results as eager and one graph for every sequence length."""

import pytest
import torch
from torch._dynamo.utils import counters

from slimtune.model import compile as compile_mod

from .conftest import count_calls, train_tiny


@pytest.fixture
def traced(monkeypatch):
    """Trace with aot_eager (dynamo + AOTAutograd, the graphs inductor would get, no code
    generation: seconds, not minutes, on the CI's CPU); a clean dynamo cache and counters."""
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compiled_layers_above_a_cached_cut_equal_eager(tiny_dir, intent_file, tmp_path, traced):
    """--cache-frozen's lookup runs eagerly between the compiled layers."""
    common = dict(freeze_below=2, cache_frozen=True, max_steps=6, batch_size=12, lr=1e-3, seed=3)
    eager = train_tiny(tiny_dir, intent_file, tmp_path / "eager", **common)
    compiled = train_tiny(tiny_dir, intent_file, tmp_path / "compiled", compile=True, **common)
    assert traced["stats"]["unique_graphs"] > 0
    assert compiled.summary["frozen_cache"]["served"] == 3  # the second epoch
    got = [h["loss"] for h in compiled.history]
    assert got == pytest.approx([h["loss"] for h in eager.history], rel=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {}),
        ("sparse", {}),
        ("experts", {"dispatch": "dense"}),  # the GPU's training path
        ("experts", {"dispatch": "routed"}),  # partly eager: data-dependent row counts
        ("full", {}),
    ],
)
def test_compiled_training_equals_eager(tiny_dir, intent_file, tmp_path, traced, method, options):
    common = dict(method=method, method_options=options, max_steps=5, lr=1e-3, seed=3, eval_every=2)
    eager = train_tiny(tiny_dir, intent_file, tmp_path / "eager", **common)
    compiled = train_tiny(tiny_dir, intent_file, tmp_path / "compiled", compile=True, **common)
    assert traced["stats"]["unique_graphs"] > 0  # it did compile
    if method in ("lora", "sparse", "full"):  # no recompile after the first step (a None
        assert traced["stats"]["unique_graphs"] <= 2  # attribute becoming a tensor would)
    if method in ("lora", "sparse", "full") or options.get("dispatch") == "dense":
        assert not traced["graph_break"]  # whole layers, nothing left to eager
    got = [h["loss"] for h in compiled.history]
    want = [h["loss"] for h in eager.history]
    assert got == pytest.approx(want, rel=1e-5)
    # the evals inside the loop (eval_every) run eagerly, on the same weights
    inside = [h["eval_loss"] for h in compiled.history if "eval_loss" in h]
    assert len(inside) == 2
    assert inside == pytest.approx([h["eval_loss"] for h in eager.history if "eval_loss" in h])
    assert compiled.summary["eval_loss"] == pytest.approx(eager.summary["eval_loss"], rel=1e-5)
    assert "torch.compile" in compiled.summary["fused_kernels"]
    assert not eager.summary.get("fused_kernels")


def test_compiled_experts_under_autocast_trace_the_plain_operators(
    tiny_dir, intent_file, tmp_path, traced, monkeypatch
):
    """Under bf16 autocast eager expert layers run the fused functions (``experts/fused.py``,
    hand-written backward); compiled layers trace the plain operators instead, which
    inductor fuses itself: no graph break, and the same losses to bf16's rounding."""
    from slimtune.methods.experts import fused

    calls = count_calls(monkeypatch, fused.DenseExpertsFunction)
    common = dict(
        method="experts", method_options={"dispatch": "dense"}, max_steps=4, lr=1e-3, seed=3,
        precision="bf16",
    )  # fmt: skip
    eager = train_tiny(tiny_dir, intent_file, tmp_path / "eager", **common)
    assert calls  # eager bf16 training took the fused path
    calls.clear()
    compiled = train_tiny(tiny_dir, intent_file, tmp_path / "compiled", compile=True, **common)
    assert traced["stats"]["unique_graphs"] > 0 and not traced["graph_break"]
    assert not calls  # the compiled steps traced the plain operators
    got = [h["loss"] for h in compiled.history]
    want = [h["loss"] for h in eager.history]
    assert got == pytest.approx(want, rel=2e-2)


@pytest.mark.parametrize(
    "method, options, frames",
    [
        ("lora", {}, 1),
        ("experts", {"dispatch": "dense"}, 2),  # the router's hook, then the layer's forward
    ],
)
def test_one_graph_for_every_length(tiny_dir, tmp_path, traced, method, options, frames):
    from .conftest import write_jsonl

    # prompts of 1 to 12 words: every batch pads to another length
    rows = [
        {"prompt": "word " * (1 + i % 12) + "Intent:", "completion": " billing"} for i in range(48)
    ]
    data = write_jsonl(tmp_path / "lengths.jsonl", rows)
    train_tiny(
        tiny_dir,
        data,
        tmp_path / "run",
        method=method,
        method_options=options,
        compile=True,
        max_steps=8,
        eval_fraction=0.0,
    )
    # two graphs per compiled frame: the first layer's input needs no gradient (frozen
    # embeddings), the others' does; no graph per length, none for evaluation
    assert traced["stats"]["unique_graphs"] <= 2 * frames
    assert not traced["graph_break"] or method != "lora"


@pytest.fixture
def inductor():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_inductor_compiles_the_lora_step_on_cpu(tiny_dir, intent_file, tmp_path, inductor):
    """The real backend once, LoRA with its default dropout: inductor's generated kernels
    train as eager does, with the same dropout masks."""
    common = dict(method="lora", max_steps=3, lr=1e-3, eval_fraction=0.0)
    eager = train_tiny(tiny_dir, intent_file, tmp_path / "eager", **common)
    compiled = train_tiny(tiny_dir, intent_file, tmp_path / "compiled", compile=True, **common)
    assert inductor["stats"]["unique_graphs"] > 0
    got = [h["loss"] for h in compiled.history]
    want = [h["loss"] for h in eager.history]
    assert got[0] == pytest.approx(want[0], rel=1e-5)  # the same weights: one forward apart
    # inductor reorders float sums; Adam's first steps magnify that a little
    assert got == pytest.approx(want, rel=1e-3)


def test_leaving_the_block_restores_the_layers(tiny, traced):
    from slimtune.model.anatomy import decoder_layers
    from slimtune.model.compile import compiled_layers

    layers = decoder_layers(tiny.model)
    with compiled_layers(tiny.model) as n:
        assert n == len(layers)
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_cuda_graphs_compile_apart_in_inductors_graph_mode(tiny, monkeypatch):
    """A layer's compiled call is kept per backend and graph mode: asking for CUDA graphs
    after a plain compile makes a second one, in inductor's "reduce-overhead" mode."""
    from slimtune.model.anatomy import decoder_layers
    from slimtune.model.compile import compiled_layers

    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw["mode"]) or fn)
    with compiled_layers(tiny.model, backend="inductor"):
        pass
    with compiled_layers(tiny.model, backend="inductor", cuda_graphs=True):
        pass
    layers = len(decoder_layers(tiny.model))
    assert modes == [None] * layers + ["reduce-overhead"] * layers
    for layer in decoder_layers(tiny.model):
        assert set(layer.__dict__["_slimtune_compiled"]) == {
            ("inductor", False),
            ("inductor", True),
        }


def test_a_bad_backend_or_an_old_torch_is_refused(tiny, monkeypatch):
    from slimtune.errors import UserInputError
    from slimtune.model.anatomy import decoder_layers
    from slimtune.model.compile import compiled_layers
    from slimtune.training.config import TrainConfig

    monkeypatch.setattr(compile_mod, "BACKEND", "inductr")
    refused = pytest.raises(UserInputError, match="SLIMTUNE_COMPILE_BACKEND='inductr'")
    with refused, compiled_layers(tiny.model):
        pass
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(tiny.model))
    graphs = pytest.raises(UserInputError, match="CUDA graphs come from inductor")
    with graphs, compiled_layers(tiny.model, backend="aot_eager", cuda_graphs=True):
        pass
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(UserInputError, match=r"--compile needs torch >= 2\.5"):
        TrainConfig(data="x.jsonl", compile=True).validated()
