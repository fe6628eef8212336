"""One stderr console for status lines, so stdout stays for results."""

import os

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """Print a status line; under torchrun / accelerate launch only rank 0 does (the
    others would repeat it)."""
    if int(os.environ.get("RANK", "0")):
        return
    console.print(f"[dim]slimtune:[/dim] {message}")
