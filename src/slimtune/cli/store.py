"""``slimtune delta ...`` and ``slimtune ab``: the versioned store from the command line."""

from __future__ import annotations

import argparse
import json

from ..errors import DeltaError
from ..eval.tasks import TASKS
from .common import add_quantize_arg, at_least_one


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        help="store folder (default $SLIMTUNE_STORE, else $XDG_DATA_HOME/slimtune/store, "
        "else ~/.local/share/slimtune/store)",
    )


def build(sub) -> None:
    d = sub.add_parser(
        "delta",
        help="the versioned delta store: list, show, tag, split, diff, verify, "
        "rm, gc, reindex, apply, rollback, export, import, add",
        description="Versions of fine-tuned deltas with an SQLite index. IDs are "
        "v1, v2, ...; tags (e.g. prod) name versions and move "
        "atomically.",
    )
    add_store_arg(d)
    ds = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    ds.add_parser("list", help="every version, with its tags")
    p = ds.add_parser("show", help="one version's manifest summary")
    p.add_argument("ref", help="version id, tag or 'latest'")
    p = ds.add_parser("tag", help="point a tag at a version (atomically)")
    p.add_argument("ref")
    p.add_argument("name")
    p = ds.add_parser(
        "split",
        help="set, remove or list A/B splits that slimtune serve reads per request",
        description="`split NAME ARM=W,ARM=W`: requests for NAME go to each arm (a tag, a "
        "version or base) in proportion to its weight, the same arm for the same user, "
        "from the next request on (no restart). `split NAME --rm` removes it; `split` "
        "lists them.",
    )
    p.add_argument("name", nargs="?")
    p.add_argument("arms", nargs="?", help="e.g. prod=90,v5=10")
    p.add_argument("--rm", action="store_true", help="remove the split NAME")
    p = ds.add_parser("diff", help="what differs between two versions")
    p.add_argument("a")
    p.add_argument("b")
    p = ds.add_parser(
        "verify",
        help="check the checksums of one version or of all (and, for "
        "all, that objects/ and the index agree)",
    )
    p.add_argument("ref", nargs="?")
    p = ds.add_parser(
        "rm", help="remove a version (refused while a tag, a child or an A/B split uses it)"
    )
    p.add_argument("ref")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove it anyway, with its tags and the splits that name it; its children "
        "keep no parent",
    )
    ds.add_parser(
        "gc",
        help="move folders no version owns (e.g. after a killed save) to "
        "quarantine/; remove staging leftovers of dead adds",
    )
    ds.add_parser(
        "reindex",
        help="rebuild the index from the manifests in objects/ (after the "
        "index was lost or corrupted; tags and notes are not kept)",
    )
    p = ds.add_parser("rollback", help="move a tag back to the version it pointed at before")
    p.add_argument("tag", nargs="?", default="prod")
    p = ds.add_parser("apply", help="write base + delta as a model folder transformers loads")
    p.add_argument("ref")
    p.add_argument("--model", help="the base (default: the one the delta's manifest records)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the written weights (merged in fp32 into the full-precision base, "
        "then cast; default: bf16 for a delta trained with --quantize, else the base's own "
        "as its config records it, else fp32)",
    )
    p = ds.add_parser(
        "export",
        help="export a version for serving engines: peft's format, or merged",
        description="--format peft: a lora, dora or shira version as a plain peft adapter "
        "folder; a rosa version as DIR/base (the base with its sparse part merged) and "
        "DIR/adapter (its LoRA part), which vLLM serves as base + LoRA. --format merged: "
        "base + delta as one model folder (as `delta apply --out`).",
    )
    p.add_argument("ref")
    p.add_argument("dir")
    p.add_argument("--format", default="peft", choices=["peft", "merged"])
    p.add_argument("--model", help="the base (default: the one the delta's manifest records)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="dtype of written model weights (merged, or rosa's base); default as for apply",
    )
    p = ds.add_parser(
        "import",
        help="import a peft LoRA, DoRA or SHiRA adapter folder as a new "
        "version, after checking it fits its base",
    )
    p.add_argument("dir")
    p.add_argument(
        "--model",
        help="the base it was trained on (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--note")
    p = ds.add_parser("add", help="add a slimtune delta folder as a new version")
    p.add_argument("dir")
    p.add_argument("--parent")
    p.add_argument("--note")

    ab = sub.add_parser(
        "ab",
        help="A/B-test two deltas on the same examples, or on live traffic (--log)",
        description="With --data: evaluates two deltas (ids, tags or folders) on one "
        "loaded base with the same examples; reports the paired difference (bootstrap CI, "
        "McNemar for accuracy), the winner, and cost figures side by side. With --log: "
        "compares the outcomes `slimtune serve --log` recorded for two versions (or split "
        "arms): unpaired bootstrap CI, Fisher's exact test for 0/1 outcomes.",
    )
    add_store_arg(ab)
    ab.add_argument("a", nargs="?", help="delta A (with --log: default, the two most rated)")
    ab.add_argument("b", nargs="?")
    ab.add_argument("--data", help="examples both deltas are evaluated on")
    ab.add_argument("--log", help="a request log of slimtune serve --log")
    ab.add_argument("--split", help="with --log: only the requests of this split")
    ab.add_argument("--model", help="the base (default: the one delta A's manifest records)")
    ab.add_argument("--device", default="auto")
    add_quantize_arg(ab)
    ab.add_argument("--task", default="auto", choices=TASKS, help="default: auto (from the data)")
    ab.add_argument("--limit", type=at_least_one, help="only the first N examples")
    ab.add_argument("--output", help="write the result as JSON here")


def _store(args):
    from ..delta import DeltaStore

    return DeltaStore(args.store)


def _fmt_version(store, v, tags) -> list[str]:
    try:
        acc = (v.manifest(method_files=False).get("metrics") or {}).get("eval_accuracy")
        note = v.note or ""
    except DeltaError:  # one bad version must not hide the others; verify says why
        acc, note = None, "(manifest unreadable: see delta verify)"
    if not isinstance(acc, (int, float)):
        acc = None
    return [
        v.id,
        ",".join(t for t, vid in tags.items() if vid == v.id),
        v.method,
        v.parent or "",
        f"{100 * acc:.1f}%" if acc is not None else "-",
        f"{v.bytes / 2**20:.2f} MiB",
        v.created,
        note,
    ]


def cmd_delta(args) -> int:
    from ..eval.report import print_table

    a = args.action
    if a == "reindex":  # the one command that works on a store whose index is broken
        return _reindex(args)
    store = _store(args)
    if a == "list":
        tags = store.tags()
        print_table(
            f"slimtune delta list ({store.root})",
            ["id", "tags", "method", "parent", "accuracy", "size", "created", "note"],
            [_fmt_version(store, v, tags) for v in store.list()],
        )
    elif a == "show":
        print(json.dumps(store.describe(store.resolve(args.ref)), indent=2, default=str))
    elif a == "tag":
        old, new = store.tag(args.name, args.ref)
        print(f"{args.name}: {old or '(new)'} -> {new}")
    elif a == "rollback":
        old, new = store.rollback(args.tag)
        print(f"{args.tag}: {old} -> {new}")
    elif a == "split":
        _split(store, args)
    elif a == "diff":
        from ..delta.store import diff

        print(json.dumps(diff(store.resolve(args.a), store.resolve(args.b)), indent=2, default=str))
    elif a == "verify":
        bad = 0
        for vid, problem in store.verify(args.ref):
            print(f"{vid}: {'ok' if problem is None else problem}")
            bad += problem is not None
        if bad:
            raise DeltaError(f"{bad} version(s) failed verification")
    elif a == "rm":
        print(f"removed {store.remove(args.ref, force=args.force)}")
    elif a == "gc":
        r = store.gc()
        print(
            f"moved {len(r.quarantined)} unowned folder(s) to {store.quarantine}"
            + "".join(f"\n  {src} -> {dst}" for src, dst in r.quarantined)
            + (f"\nremoved {len(r.removed)} staging leftover(s)" if r.removed else "")
            + (f"\nleft {len(r.in_use)} staging folder(s) of adds in progress" if r.in_use else "")
        )
    elif a == "add":
        v = store.add(args.dir, parent=args.parent, note=args.note)
        print(v.id)
    elif a == "apply":
        _apply_to_folder(store, args)
    elif a == "export" and args.format == "merged":
        args.out = args.dir
        _apply_to_folder(store, args)
    elif a == "export":
        _export_peft(store, args)
    elif a == "import":
        print(_import_peft(store, args).id)
    return 0


def _reindex(args) -> int:
    from ..delta import DeltaStore

    store, added, skipped, aside = DeltaStore.reindex(args.store)
    if aside is not None:
        print(f"moved the unreadable index to {aside}")
    print(
        f"indexed {len(added)} folder(s) of {store.objects}: {', '.join(added) or '-'} "
        "(tags, notes and parents are not recorded in the folders: set tags again)"
    )
    for folder, why in skipped:
        print(f"  skipped {folder}: {why}")
    return 0


def _split(store, args) -> None:
    from ..errors import UserInputError

    if args.name is None:
        for name, arms in store.splits().items():
            print(f"{name}: {arms}")
        return
    if args.rm:
        if args.arms:
            raise UserInputError("split NAME --rm takes no arms")
        print(f"removed split {args.name} ({store.remove_split(args.name)})")
        return
    if not args.arms:
        raise UserInputError(f"split {args.name}: give its arms, e.g. prod=90,v5=10 (or --rm)")
    old, new = store.set_split(args.name, args.arms)
    print(f"split {args.name}: {old or '(new)'} -> {new}")


def _apply_to_folder(store, args) -> None:
    from ..delta.apply import merge_to_folder

    v = store.resolve(args.ref)
    m = merge_to_folder(v.path, args.out, model=args.model, dtype=args.dtype, ref=v.id)
    print(f"wrote {m.out} (base {m.base} + {v.id}, merged; {m.dtype}: {m.dtype_reason})")


def _export_peft(store, args) -> None:
    from ..delta.peft_io import export_peft

    v = store.resolve(args.ref)
    out = export_peft(v, args.dir, model=args.model, dtype=args.dtype)
    if (out / "adapter").is_dir():
        print(
            f"wrote {out}/base (the base with {v.id}'s sparse part merged) and {out}/adapter "
            f"(its LoRA part): vllm serve {out}/base --enable-lora --lora-modules "
            f"{v.id}={out}/adapter"
        )
    else:
        print(f"wrote {out}: load it with peft.PeftModel.from_pretrained(base, {str(out)!r})")


def _import_peft(store, args):
    """Check a peft adapter folder against its base and store it (see delta.peft_io)."""
    from ..delta.peft_io import import_peft
    from ..log import info

    r = import_peft(store, args.dir, model=args.model, note=args.note)
    if args.model and r.adapter_base and r.adapter_base != args.model:
        info(
            f"the adapter names base {r.adapter_base}; imported for --model {args.model} "
            "(it fits that model's shapes)"
        )
    return r.version


def _ab_log(args) -> int:
    from ..errors import UserInputError
    from ..eval.abtest import ab_from_log
    from ..eval.report import fmt, print_table
    from ..fileio import write_json
    from ..log import info
    from ..serve.traffic import read_log

    requests, warnings = read_log(args.log)
    for w in warnings:
        info(f"warning: {w}")
    try:
        r = ab_from_log(requests, args.a, args.b, split=args.split)
    except ValueError as e:
        raise UserInputError(f"{args.log}: {e}") from None
    A, B = r["A"], r["B"]
    rows = [
        ["requests", fmt(A["requests"], "int"), fmt(B["requests"], "int")],
        ["outcomes", fmt(A["outcomes"], "int"), fmt(B["outcomes"], "int")],
        [
            "independent units",
            f"{A['units']} {A['unit']}",
            f"{B['units']} {B['unit']}",
        ],
        ["mean outcome", f"{A['mean_outcome']:.3f}", f"{B['mean_outcome']:.3f}"],
        ["latency p50", fmt(A["latency_p50_ms"], "ms"), fmt(B["latency_p50_ms"], "ms")],
        ["latency p95", fmt(A["latency_p95_ms"], "ms"), fmt(B["latency_p95_ms"], "ms")],
        ["served by", ", ".join(A["served_by"]), ", ".join(B["served_by"])],
    ]
    where = f"split {args.split}, " if args.split else ""
    print_table(
        f"slimtune ab (live traffic, {where}{args.log}): {A['ref']} vs {B['ref']}",
        ["", f"A: {A['ref']}", f"B: {B['ref']}"],
        rows,
    )
    b = r["bootstrap"]
    line = f"B - A = {b['mean_diff']:+.3f} (95% CI {b['ci_low']:+.3f} .. {b['ci_high']:+.3f})"
    if "fisher" in r:
        line += f"; Fisher's exact test: p = {r['fisher']['p_value']:.3g}"
    print(line)
    winner = {"A": A["ref"], "B": B["ref"]}.get(r["winner"], "neither (tie)")
    print(f"winner: {winner}, {'significant' if r['significant'] else 'not significant'} at 5%")
    if not r["randomised"]:
        print(
            "note: not restricted to a split (--split NAME): who saw which side was not "
            "randomised, so the difference may not be the deltas'"
        )
    if args.output:
        write_json(args.output, r)
    return 0


def cmd_ab(args) -> int:
    from ..errors import UserInputError

    if (args.data is None) == (args.log is None):
        raise UserInputError("ab: give --data (offline examples) or --log (live traffic)")
    if args.log:
        if (args.a is None) != (args.b is None):
            raise UserInputError("ab --log: name both A and B, or neither")
        return _ab_log(args)
    if args.a is None or args.b is None:
        raise UserInputError("ab --data: name the two deltas, A and B")
    if args.split:
        raise UserInputError("ab: --split reads a --log")
    return _ab_data(args)


def _ab_data(args) -> int:
    from ..data import load_dataset
    from ..delta import DeltaSwitcher
    from ..eval.abtest import run_ab
    from ..eval.evaluate import first_records
    from ..eval.report import fmt, print_table
    from ..fileio import write_json
    from ..model.loading import resolve_device
    from ..model.quantize import quantization_of

    sw = DeltaSwitcher.with_delta(
        args.a,
        _store(args),
        args.model,
        quantize=args.quantize,
        device=resolve_device(args.device),
    )
    loaded = sw.loaded
    ds = load_dataset(args.data, loaded.tokenizer)
    ds, task, labels = first_records(ds, args.task, args.limit)
    r = run_ab(sw, args.a, args.b, ds, task=task, labels=labels)
    r["quantize"] = quantization_of(sw.base)  # how the base's weights were stored
    metric = r["metric"]
    rows = []
    for key, label, kind in [
        (metric, metric, "pct" if metric != "loss" else "f3"),
        ("latency_p50_ms", "decode latency p50", "ms"),
        ("latency_p95_ms", "decode latency p95", "ms"),
    ]:
        rows.append(
            [label, fmt(r["A"]["metrics"].get(key), kind), fmt(r["B"]["metrics"].get(key), kind)]
        )
    rows.append(
        [
            "trainable params",
            fmt(r["A"]["trainable_params"], "int"),
            fmt(r["B"]["trainable_params"], "int"),
        ]
    )
    rows.append(
        ["delta on disk", fmt(r["A"]["delta_bytes"], "bytes"), fmt(r["B"]["delta_bytes"], "bytes")]
    )
    print_table(
        f"slimtune ab: {r['A']['ref']} vs {r['B']['ref']} on {r['examples']} examples "
        f"({r['task']}" + (f", {r['quantize']} base)" if r["quantize"] != "none" else ")"),
        ["", f"A: {r['A']['ref']}", f"B: {r['B']['ref']}"],
        rows,
    )
    b = r["bootstrap"]
    scale = 100 if metric != "loss" else 1
    unit = " points" if metric != "loss" else ""
    line = (
        f"B - A = {scale * b['mean_diff']:+.2f}{unit} (95% CI {scale * b['ci_low']:+.2f} .. "
        f"{scale * b['ci_high']:+.2f})"
    )
    if "mcnemar" in r:
        m = r["mcnemar"]
        line += f"; McNemar: {m['only_a']} right only with A, {m['only_b']} only with B, p = {m['p_value']:.3g}"
    print(line)
    winner = {"A": r["A"]["ref"], "B": r["B"]["ref"]}.get(r["winner"], "neither (tie)")
    print(f"winner: {winner}, {'significant' if r['significant'] else 'not significant'} at 5%")
    if args.output:
        write_json(args.output, r)
    return 0
