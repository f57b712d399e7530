"""argparse value types shared by the `form` commands."""

from __future__ import annotations

import argparse


def int_in(lo: int, hi: int | None = None, what: str = "a number"):
    """An argparse type: an integer in lo..hi (no upper bound when hi is None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {value}")
        return value

    return convert
