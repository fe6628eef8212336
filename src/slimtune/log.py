"""One stderr console for status lines, so stdout stays for results."""

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console.print(f"[dim]slimtune:[/dim] {message}")
