"""Wording shared by every message that prints a count or a size."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 wav', '2 wavs', '0 wavs': the count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def first_few(items: list[str], shown: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e, ...': a list a log line names without running on."""
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def byte_size(count: float) -> str:
    """'1.50 GiB', '12.0 MiB', '3.2 KiB', '512 B': a size in the largest binary unit it fills (a budget of a few
    MiB printed in GiB read "0.00 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}" if unit == "GiB" else f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"
