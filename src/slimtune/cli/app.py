"""The ``slimtune`` command: the parser of every command, and running one.

User errors print one line (``slimtune: error: ...``) and exit with the error's code
(see :mod:`slimtune.errors`); only bugs show a traceback. Each command group lives in its own
module (train.py: train and sweep; run.py: eval, generate, demo, fetch; salf.py: analyze and
plan; store.py: delta and ab); they parse, call the library and print.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import EXIT_CODES, SlimtuneError, UserInputError
from ..lazy import exports

# re-exported: tests and callers import them from here
if TYPE_CHECKING:  # a type checker reads each name from its module (and flags typos)
    from .train import StoreOptions, train_config_from_args, train_options_from_args
else:
    __getattr__, __dir__ = exports(
        __name__,
        dict.fromkeys(
            ["StoreOptions", "train_config_from_args", "train_options_from_args"], ".train"
        ),
    )

__all__ = [
    "COMMANDS",
    "StoreOptions",
    "build_parser",
    "main",
    "train_config_from_args",
    "train_options_from_args",
]


def build_parser(store_only: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; ``train``/``sweep`` get the flags of the methods registered
    now (see :mod:`slimtune.cli.train`), which imports torch. ``store_only``: the store's
    commands' parsers alone (``delta``, ``ab``), which need no torch, so that ``slimtune
    delta ...``, ``slimtune ab --log`` and ``slimtune --version`` start in a fraction of a
    second (``ab --data`` imports torch when it runs)."""
    from ..version import __version__
    from . import store

    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Resource-efficient fine-tuning: train, evaluate and store small deltas.",
        epilog="Exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"slimtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if store_only:
        store.build(sub)
        return parser
    from . import run, salf, serve, train

    for add in (
        train.train_parser,
        train.sweep_parser,
        run.eval_parser,
        run.generate_parser,
        salf.analyze_parser,
        salf.plan_parser,
        run.demo_parser,
        run.fetch_parser,
        store.build,
        serve.serve_parser,
        serve.dashboard_parser,
    ):
        add(sub)
    return parser


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command's function, its module imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), function)(args)

    return run


COMMANDS = {
    "train": _command("train", "cmd_train"),
    "sweep": _command("train", "cmd_sweep"),
    "eval": _command("run", "cmd_eval"),
    "generate": _command("run", "cmd_generate"),
    "analyze": _command("salf", "cmd_analyze"),
    "plan": _command("salf", "cmd_plan"),
    "demo": _command("run", "cmd_demo"),
    "fetch": _command("run", "cmd_fetch"),
    "delta": _command("store", "cmd_delta"),
    "ab": _command("store", "cmd_ab"),
    "serve": _command("serve", "cmd_serve"),
    "dashboard": _command("serve", "cmd_dashboard"),
}


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    # Deprecation chatter between transformers and peft versions is not the user's to act on.
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    # bitsandbytes (imported by peft where installed) asks CPUs with AVX512-BF16 to install
    # `kernels` and fetch a 4-bit kernel from the Hub; slimtune's 4-bit path needs neither
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Liger 0.8.5 warns, twice a run, that its backends for other hardware (CuTe DSL,
    # Ascend) did not import; its Triton kernels, the ones slimtune uses, are unaffected
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(store_only=argv[:1] in (["delta"], ["ab"], ["--version"]))
    args = parser.parse_args(argv)
    finished = False
    try:
        code = _run(args)
        finished = code == 0
        return code
    finally:
        _end_process_group(finished)


def _end_process_group(finished: bool) -> None:
    """Under torchrun / accelerate launch, end the process group a command started before
    the interpreter exits. A gloo worker thread releases a collective's tensors after the
    caller has its result, which takes the GIL; if the interpreter is finalizing by then the
    thread is torn down inside a destructor and the finished process aborts ("terminate
    called without an active exception", exit -6; seen on a rank whose last collective was
    the main process' broadcast). A barrier first gives those threads the GIL while it waits.
    Only after a successful command (after a failure or a refusal the others may never reach
    it; the launcher stops them), and its own failure is not the command's: the main process
    may have failed after the last collective (storing the delta), or outlasted the group's
    timeout."""
    if "torch" not in sys.modules:  # a command that never imported torch started no group
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()


def _run(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        hint = " (resume with --resume)" if args.command == "train" else ""
        print(f"slimtune: interrupted{hint}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == 28:  # ENOSPC: nothing was replaced, every write is atomic
            # a copy's error names its source first and what it was writing second
            print(
                f"slimtune: error: disk full while writing {e.filename2 or e.filename or ''}; "
                "nothing already stored was changed",
                file=sys.stderr,
            )
            return UserInputError.exit_code
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
