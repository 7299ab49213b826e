"""Words and numbers in messages: plurals with thousands separators (torch-free, for the CLI)."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 epoch', '2 epochs', '1,024 images'."""
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{count:,} {word}"
