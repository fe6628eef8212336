"""Sparse fine-tuning: selection, the sparse delta's math, exact merge/un-merge, regrow."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.delta import load_delta
from slimtune.errors import DeltaError
from slimtune.methods.importance import importance_scores, select_top
from slimtune.methods.rosa import LORA_FILES
from slimtune.methods.sparse import (
    SPARSE_FILE,
    apply_sparse,
    attach,
    detach_delta,
    remove_sparse,
    sparse_modules,
)
from slimtune.model.loading import fingerprint, load_model

from .conftest import train_tiny


def test_values_gradient_is_the_dense_gradient_at_the_indices():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    ref = nn.Linear(6, 5)
    ref.load_state_dict(lin.state_dict())
    idx = torch.tensor([0, 7, 13, 29])
    d = attach(lin, idx)
    with torch.no_grad():
        d.values.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))
        ref.weight.view(-1)[idx] += d.values
    x = torch.randn(3, 4, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    lin(x).pow(2).sum().backward()
    ref(xr).pow(2).sum().backward()
    torch.testing.assert_close(d.values.grad, ref.weight.grad.view(-1)[idx])
    torch.testing.assert_close(x.grad, xr.grad)


def test_detach_restores_or_keeps_the_merge_exactly():
    lin = nn.Linear(8, 8)
    base = lin.weight.detach().clone()
    d = attach(lin, torch.tensor([1, 9, 63]))
    with torch.no_grad():
        d.values.fill_(0.3)
    lin(torch.randn(2, 8))  # the forward writes base + values
    assert not torch.equal(lin.weight, base)
    detach_delta(lin, keep_merged=False)
    assert torch.equal(lin.weight, base) and not hasattr(lin, "sparse_delta")
    assert "forward" not in lin.__dict__


@pytest.fixture(scope="module")
def sparse_run(tiny_dir, tmp_path_factory):
    from .conftest import intent_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("sparse")
    data = write_jsonl(tmp / "d.jsonl", intent_rows())
    return train_tiny(
        tiny_dir,
        data,
        tmp / "run",
        method="sparse",
        max_steps=5,
        freeze_below=1,
        method_options={"density": 0.05, "importance": "fisher"},
    )


def test_only_selected_positions_change_and_state_is_the_subset(sparse_run, tiny_dir):
    base = load_model(str(tiny_dir)).model
    trained = dict(sparse_run.model.named_parameters())
    mods = sparse_modules(sparse_run.model)
    assert mods and all(".layers.0." not in n for n in mods)  # nothing below freeze_below
    k_total = 0
    for name, m in mods.items():
        before = dict(base.named_parameters())[f"{name}.weight"].detach().view(-1)
        after = m.weight.detach().view(-1)
        changed = (before != after).nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(m.sparse_delta.indices.tolist())
        assert changed.numel() > 0
        # the default structure: whole input columns, 5% of them
        assert m.sparse_delta.indices.numel() == round(0.05 * m.in_features) * m.out_features
        assert m.sparse_delta.cols is not None
        k_total += m.sparse_delta.indices.numel()
    other = [n for n, p in trained.items() if p.requires_grad and "sparse_delta" not in n]
    assert other == []
    assert sparse_run.summary["trainable_params"] == k_total
    manifest = sparse_run.manifest
    assert manifest["method_config"]["density"] == 0.05
    assert manifest["method_config"]["importance"] == "fisher"


def test_optimizer_state_is_the_size_of_the_subset(tiny_dir, intent_file, tmp_path):
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    t = Trainer(
        TrainConfig(
            model=str(tiny_dir),
            data=str(intent_file),
            method="sparse",
            method_options={"density": 0.02},
            max_steps=1,
            batch_size=4,
            output_dir=str(tmp_path / "r"),
            progress=False,
            device="cpu",
        )
    )
    t.run()
    k = sum(m.sparse_delta.indices.numel() for m in sparse_modules(t.model).values())
    state = [
        v
        for s in t.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]
    assert sum(v.numel() for v in state) == 2 * k  # exp_avg + exp_avg_sq, nothing dense


def test_apply_and_remove_are_exact_and_reproduce_the_trained_model(sparse_run, tiny_dir):
    fresh = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    model, _ = load_delta(sparse_run.delta_dir, fresh.model, fingerprint(fresh.model))
    ids = torch.tensor([fresh.tokenizer("Message: parcel late\nIntent:")["input_ids"]])
    with torch.no_grad():
        ours = sparse_run.model.eval()(input_ids=ids).logits
        applied = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(applied, ours)
    remove_sparse(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(DeltaError, match="no sparse delta is applied"):
        remove_sparse(model)
    tensors = load_file(str(sparse_run.delta_dir / SPARSE_FILE))
    assert all(v.dtype == torch.int32 for k, v in tensors.items() if k.endswith(".indices"))


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    path = dst / SPARSE_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t, m: t.__setitem__(
                next(k for k in t if k.endswith(".indices")),
                t[next(k for k in t if k.endswith(".indices"))] + 10**6,
            ),
            "has indices outside its weight",
        ),
        (
            lambda t, m: m.__setitem__(next(k for k in m if k.endswith(".shape")), "3,3"),
            r"was trained on a weight of shape \(3,3\)",
        ),
        (
            lambda t, m: t.__setitem__(next(k for k in t if k.endswith(".values")), torch.zeros(1)),
            "indices but 1 values",
        ),
    ],
)
def test_bad_sparse_deltas_are_refused(sparse_run, tiny_dir, tmp_path, edit, message):
    path = _corrupt(sparse_run.delta_dir, tmp_path / "d", edit)
    fresh = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    with pytest.raises(DeltaError, match=message):
        apply_sparse(fresh.model, path)
    assert all(torch.equal(p, before[n]) for n, p in fresh.model.named_parameters())


def test_regrow_keeps_the_density_and_moves_the_selection(tiny_dir, intent_file, tmp_path):
    from slimtune.methods.sparse import candidate_modules

    fresh = load_model(str(tiny_dir))
    mods = candidate_modules(fresh.model, list(range(4)), None)
    initial = select_top(importance_scores(fresh.model, mods, "random", None), 0.05, "per_tensor")

    def moved_after(regrow_every: int, out: str) -> int:
        res = train_tiny(
            tiny_dir,
            intent_file,
            tmp_path / out,
            method="sparse",
            max_steps=6,
            method_options={
                "density": 0.05,
                "regrow_every": regrow_every,
                "regrow_fraction": 0.2,
                "importance": "random",
                "structure": "entries",  # regrow moves entries
            },
        )
        moved = 0
        for name, m in sparse_module_items(res.model):
            idx = m.sparse_delta.indices
            assert idx.numel() == initial[name].numel() == round(0.05 * m.weight.numel())
            assert torch.unique(idx).numel() == idx.numel()
            moved += len(set(idx.tolist()) - set(initial[name].tolist()))
        return moved

    assert moved_after(0, "still") == 0  # the control: same selection without regrow
    assert moved_after(2, "regrow") > 0


def test_a_regrow_never_repeats_an_entry_nor_comes_after_the_last_step(
    tiny_dir, intent_file, tmp_path
):
    """Density 0.6 with a regrow of 70%: more entries asked for than are unselected (topk
    took selected ones again, and apply then refused the delta). A regrow armed so that it
    would run after the last optimizer step left its new entries untrained (zeros)."""
    from safetensors.torch import load_file

    for name, options, steps in (
        ("dense", {"density": 0.6, "regrow_fraction": 0.7, "regrow_every": 1}, 3),
        ("last", {"density": 0.05, "regrow_fraction": 0.2, "regrow_every": 2}, 3),
    ):
        res = train_tiny(
            tiny_dir,
            intent_file,
            tmp_path / name,
            method="sparse",
            max_steps=steps,
            lr=1e-2,
            method_options={**options, "importance": "random", "structure": "entries"},
        )
        for mname, m in sparse_module_items(res.model):
            idx = m.sparse_delta.indices
            assert torch.unique(idx).numel() == idx.numel(), (name, mname)
        values = [
            v for k, v in load_file(res.delta_dir / SPARSE_FILE).items() if k.endswith(".values")
        ]
        assert values and all(bool((v != 0).all()) for v in values), name  # every entry trained
        fresh = load_model(str(tiny_dir))
        load_delta(res.delta_dir, fresh.model, fingerprint(fresh.model))  # applies: no repeats


@pytest.mark.parametrize("method", ["sparse", "rosa"])
def test_resume_with_regrow_is_bit_identical(tiny_dir, intent_file, tmp_path, method):
    from slimtune.training.trainer import Trainer

    from .test_train import stop_after_checkpoint, tiny_cfg

    # every checkpoint (steps 2, 4) falls where a regrow is armed for the next backward
    opts = {
        "density": 0.05,
        "regrow_every": 2,
        "regrow_fraction": 0.2,
        "importance": "random",
        "structure": "entries",  # regrow moves entries
    }
    cfg = tiny_cfg(
        tiny_dir,
        intent_file,
        tmp_path / "k",
        method=method,
        max_steps=6,
        save_every=2,
        method_options=opts,
        eval_fraction=0.0,
    )
    whole = Trainer(
        tiny_cfg(
            tiny_dir,
            intent_file,
            tmp_path / "w",
            method=method,
            max_steps=6,
            save_every=2,
            method_options=opts,
            eval_fraction=0.0,
        )
    ).run()
    stop_after_checkpoint(cfg, 4)
    resumed = Trainer(
        tiny_cfg(
            tiny_dir,
            intent_file,
            tmp_path / "k",
            method=method,
            max_steps=6,
            save_every=2,
            method_options=opts,
            eval_fraction=0.0,
            resume=True,
        )
    ).run()
    a, b = (load_file(str(r.delta_dir / SPARSE_FILE)) for r in (whole, resumed))
    assert a.keys() == b.keys() and len(a) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    wa, wb = whole.model.state_dict(), resumed.model.state_dict()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def sparse_module_items(model):
    return sparse_modules(model).items()


def test_activation_scorer_and_global_selection(tiny):
    mods = {
        "q": tiny.model.model.layers[0].self_attn.q_proj,
        "d": tiny.model.model.layers[0].mlp.down_proj,
    }
    ids = torch.randint(3, 300, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, a[0].detach()))
        for n, m in mods.items()
    ]
    scores = importance_scores(tiny.model, mods, "activation", lambda: [batch])
    for h in hooks:
        h.remove()
    for n, m in mods.items():
        norm = seen[n].reshape(-1, seen[n].shape[-1]).pow(2).sum(0).sqrt()
        torch.testing.assert_close(scores[n], m.weight.abs() * norm[None, :])
    sel = select_top(scores, 0.1, "global")
    total = sum(s.numel() for s in scores.values())
    assert sum(i.numel() for i in sel.values()) == round(0.1 * total)
    threshold = min(float(scores[n].view(-1)[i].min()) for n, i in sel.items())
    for n, s in scores.items():
        unselected = torch.ones(s.numel(), dtype=torch.bool)
        unselected[sel.get(n, torch.tensor([], dtype=torch.long))] = False
        assert float(s.view(-1)[unselected].max()) <= threshold
    json.dumps({n: int(i.numel()) for n, i in sel.items()})


def test_rosa_trains_both_parts_round_trips_and_unmerges_exactly(tiny_dir, intent_file, tmp_path):
    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "r",
        method="rosa",
        max_steps=4,
        freeze_below=1,
        method_options={"density": 0.05, "r": 4, "delta_weight_decay": 0.1},
    )
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("sparse_delta" in n for n in trainable)
    assert all(g["weight_decay"] == 0.1 for g in res_optimizer_groups(res))
    files = set(res.manifest["files"])
    assert {*LORA_FILES.values(), SPARSE_FILE} <= files  # not peft's names: peft refuses it

    fresh = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    model, _ = load_delta(res.delta_dir, fresh.model, fingerprint(fresh.model))
    ids = torch.tensor([fresh.tokenizer("Message: parcel late\nIntent:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(input_ids=ids).logits, res.model.eval()(input_ids=ids).logits
        )
    remove_sparse(fresh.model)
    base = fresh.model.get_base_model() if hasattr(fresh.model, "get_base_model") else fresh.model
    for n, p in base.named_parameters():
        if "lora_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert torch.equal(p, before[key]), n


def res_optimizer_groups(res):
    # the optimizer is not kept on TrainResult; rebuild the groups the method asks for
    params = [p for p in res.model.parameters() if p.requires_grad]
    return res.method.param_groups(params, weight_decay=0.0)


def _column_scores():
    """Scores whose best columns are known: column j of ``a`` scores ``A_COLS[j]`` in every
    row, except one large entry in column 0 (the best entry, in a weak column)."""
    a = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5])[None, :].repeat(4, 1)
    a[0, 0] = 20.0  # column 0 sums to 20, less than columns 1, 3, 5 (36, 32, 28)
    b = torch.tensor([9.5, 0.5, 8.5, 1.0, 2.0])[None, :].repeat(8, 1)
    c = torch.zeros(2, 3)
    return {"a": a, "b": b, "c": c}


def test_select_top_columns_per_tensor_takes_the_best_whole_columns():
    from slimtune.methods.importance import column_indices
    from slimtune.methods.sparse import column_layout

    scores = _column_scores()
    sel = select_top(scores, 0.3, "per_tensor", "columns")
    assert sel.keys() == scores.keys()
    torch.testing.assert_close(sel["a"], column_indices(torch.tensor([1, 3, 5]), (4, 10)))
    torch.testing.assert_close(sel["b"], column_indices(torch.tensor([0, 2]), (8, 5)))
    assert sel["c"].numel() == 2  # at least one column: round(0.3 * 3) = 1
    for n, idx in sel.items():
        cols = column_layout(idx, scores[n].shape)
        assert cols is not None
        assert idx.numel() == max(1, round(0.3 * scores[n].shape[1])) * scores[n].shape[0]
        assert torch.equal(idx, idx.sort().values)
    # the entries structure takes the single best entry, which lies in a weak column
    assert 0 in select_top(scores, 0.05, "per_tensor")["a"].tolist()


def test_select_top_columns_global_ranks_columns_by_mean_score():
    from slimtune.methods.importance import column_indices
    from slimtune.methods.sparse import column_layout

    scores = _column_scores()
    scores["a"][0, 0] = 0.0  # column means: b0 9.5, a1 9, b2 8.5, a3 8, ...
    total = sum(s.numel() for s in scores.values())  # 86
    sel = select_top(scores, 0.28, "global", "columns")  # budget 24: b0 (8), a1 (4), b2 (8)
    assert round(0.28 * total) == 24
    assert sel.keys() == {"a", "b"}  # c: no column taken, left out
    torch.testing.assert_close(sel["a"], column_indices(torch.tensor([1, 3]), (4, 10)))
    torch.testing.assert_close(sel["b"], column_indices(torch.tensor([0, 2]), (8, 5)))
    assert sum(i.numel() for i in sel.values()) == 24
    # a budget that falls inside a column: the last column taken passes it by less than
    # its height
    sel = select_top(scores, 0.2, "global", "columns")  # budget 17
    assert {n: column_layout(i, scores[n].shape).tolist() for n, i in sel.items()} == {
        "a": [1],
        "b": [0, 2],
    }
    assert 17 <= sum(i.numel() for i in sel.values()) < 17 + 8


def test_column_fast_path_matches_the_dense_gradient_and_saves_only_the_columns():
    from slimtune.methods.importance import column_indices

    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    ref = nn.Linear(6, 5)
    ref.load_state_dict(lin.state_dict())
    cols = torch.tensor([1, 4])
    idx = column_indices(cols, lin.weight.shape)
    d = attach(lin, idx)
    assert d.cols is not None and torch.equal(d.cols, cols)
    with torch.no_grad():
        d.values.copy_(torch.linspace(-1.0, 1.0, idx.numel()))
        ref.weight.view(-1)[idx] += d.values
    x = torch.randn(3, 4, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out = lin(x)
    (saved,) = out.grad_fn.saved_tensors
    assert saved.shape == (3, 4, 2)  # x[..., cols], not x
    torch.testing.assert_close(saved, x.detach()[..., cols])
    out_ref = ref(xr)
    torch.testing.assert_close(out, out_ref)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    torch.testing.assert_close(d.values.grad, ref.weight.grad.view(-1)[idx], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad)
    # the entries path on the same indices (a regrow armed: it needs the dense gradient)
    d.values.grad = None
    d.regrow_count = 1
    x.grad = None
    out = lin(x)
    assert out.grad_fn.saved_tensors[0].shape == x.shape
    out.pow(2).sum().backward()
    torch.testing.assert_close(d.values.grad, ref.weight.grad.view(-1)[idx], rtol=1e-5, atol=1e-6)


def test_column_layout_only_for_whole_columns_in_row_major_order():
    from slimtune.methods.importance import column_indices
    from slimtune.methods.sparse import column_layout

    shape = (5, 6)
    whole = column_indices(torch.tensor([0, 3, 5]), shape)
    assert column_layout(whole, shape).tolist() == [0, 3, 5]
    assert column_layout(torch.tensor([0, 7, 13, 29]), shape) is None  # entries
    assert column_layout(torch.tensor([0, 1, 2, 3, 4]), shape) is None  # a row, not a column
    assert column_layout(whole[:-3], shape) is None  # a column cut short
    g = torch.Generator().manual_seed(0)
    assert column_layout(whole[torch.randperm(whole.numel(), generator=g)], shape) is None
    assert column_layout(whole.sort().values.flip(0), shape) is None
    assert column_layout(column_indices(torch.tensor([5, 3, 0]), shape), shape) is None
    assert column_layout(torch.tensor([], dtype=torch.long), shape) is None


def test_resume_derives_the_column_layout_from_the_loaded_indices():
    from slimtune.methods.importance import column_indices
    from slimtune.methods.sparse import SparseMethod

    model = nn.Sequential(nn.Linear(6, 5))
    d = attach(model[0], torch.tensor([0, 7, 13, 28, 29]))
    assert d.cols is None
    method = SparseMethod()
    state = method.extra_state(model)
    assert state.keys() == {"0.sparse_delta.indices", "0.sparse_delta.base_values"}
    d.indices.copy_(column_indices(torch.tensor([2]), (5, 6)))  # what a resume copies in
    method.load_state_dict(model, {})
    assert d.cols is not None and d.cols.tolist() == [2]
    assert method.extra_state(model).keys() == state.keys()  # cols is not checkpointed


def test_structure_option_is_checked():
    from slimtune.errors import UserInputError
    from slimtune.methods.rosa import RosaMethod
    from slimtune.methods.sparse import SparseOptions

    assert SparseOptions().structure == "columns"
    assert SparseOptions(regrow_every=2).structure == "entries"  # regrow needs entries
    with pytest.raises(UserInputError, match=r"regrow works on entries only.*--structure entries"):
        SparseOptions(structure="columns", regrow_every=2)
    with pytest.raises(UserInputError, match="structure must be entries or columns"):
        SparseOptions(structure="rows")
    with pytest.raises(UserInputError, match="regrow works on entries only"):
        RosaMethod({"structure": "columns", "regrow_every": 2})
    with pytest.raises(UserInputError, match="unknown structure"):
        select_top({"a": torch.rand(2, 2)}, 0.5, "per_tensor", "rows")
    assert RosaMethod({"structure": "columns"}).sparse.config.structure == "columns"


def test_columns_train_store_a_delta_that_applies_and_unapplies_exactly(
    tiny_dir, intent_file, tmp_path
):
    from slimtune.methods.sparse import column_layout

    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "cols",
        method="sparse",
        max_steps=4,
        freeze_below=1,
        method_options={"density": 0.1, "structure": "columns", "importance": "fisher"},
    )
    assert res.manifest["method_config"]["structure"] == "columns"
    base = load_model(str(tiny_dir)).model
    base_params = dict(base.named_parameters())
    mods = sparse_modules(res.model)
    assert mods
    for name, m in mods.items():
        d = m.sparse_delta
        assert d.cols is not None and torch.equal(d.cols, column_layout(d.indices, d.weight_shape))
        assert d.cols.numel() == max(1, round(0.1 * m.in_features))
        before = base_params[f"{name}.weight"].detach().view(-1)
        changed = (before != m.weight.detach().view(-1)).nonzero().squeeze(1)
        assert changed.numel() > 0 and set(changed.tolist()) <= set(d.indices.tolist())

    tensors = load_file(str(res.delta_dir / SPARSE_FILE))  # the same format as entries
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"indices", "values"}
    fresh = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    model, _ = load_delta(res.delta_dir, fresh.model, fingerprint(fresh.model))
    trained = dict(res.model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n]), n
    remove_sparse(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rosa_sparse_part_with_columns_takes_the_column_path(tiny_dir, intent_file, tmp_path):
    res = train_tiny(
        tiny_dir,
        intent_file,
        tmp_path / "rc",
        method="rosa",
        max_steps=2,
        method_options={"density": 0.05, "r": 2, "structure": "columns"},
    )
    mods = sparse_modules(res.model)
    assert mods and all(m.sparse_delta.cols is not None for m in mods.values())
    assert res.manifest["method_config"]["structure"] == "columns"


def test_resume_names_a_changed_default_and_an_old_checkpoints_shapes(
    tiny_dir, intent_file, tmp_path
):
    """A checkpoint whose options resolved differently (a default that changed between
    versions) is refused naming the option; one from before the resolved options were
    recorded is refused naming the tensor and the old default to pass."""
    from slimtune.errors import UserInputError
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    cfg = TrainConfig(
        model=str(tiny_dir),
        data=str(intent_file),
        output_dir=str(tmp_path / "r"),
        max_steps=4,
        batch_size=4,
        progress=False,
        device="cpu",
        method="sparse",
        method_options={"density": 0.1, "structure": "entries", "importance": "random"},
    )
    t = Trainer(cfg)
    t.save_checkpoint()
    t.close()
    meta_path = tmp_path / "r" / "checkpoint" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    assert meta["identity"]["method_config"]["structure"] == "entries"
    # as if "entries" had been the default when it was written
    meta["identity"]["method_options"] = {"density": 0.1, "importance": "random"}
    meta_path.write_text(json.dumps(meta))
    now = TrainConfig(
        **{
            **cfg.__dict__,
            "resume": True,
            "method_options": {"density": 0.1, "importance": "random"},
        }
    )
    with pytest.raises(UserInputError, match=r"differs in \['method option structure'\]"):
        Trainer(now)
    del meta["identity"]["method_config"]  # an older slimtune's checkpoint
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=r"has shape .* -o structure=entries"):
        Trainer(now)
