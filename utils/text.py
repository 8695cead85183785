"""Wording shared by every message that prints a count."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 wav', '2 wavs', '0 wavs': the count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"
