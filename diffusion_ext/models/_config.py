"""Argument checks shared by the models: each error names the class, the argument and what was expected."""
from __future__ import annotations


def positive_int(cls: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{cls}: {name} = {v!r}; expected a positive int")
    return v


def int_list(cls: str, name: str, v, allow_empty: bool = False) -> list[int]:
    try:
        out = list(v)
    except TypeError:
        raise ValueError(f"{cls}: {name} = {v!r}; expected a list of ints") from None
    if not out and not allow_empty:
        raise ValueError(f"{cls}: {name} is empty; expected at least one entry")
    for i, e in enumerate(out):
        positive_int(cls, f"{name}[{i}]", e)
    return out


def divisible_by_groups(cls: str, what: str, channels: int, num_groups: int) -> None:
    if channels % num_groups:
        raise ValueError(f"{cls}: {what} = {channels} is not divisible by num_groups = {num_groups} (GroupNorm "
                         f"needs whole groups); pick base_channels and channel_mults so every level's width is")


def one_of(cls: str, name: str, v, choices: tuple) -> str:
    if v not in choices:
        raise ValueError(f"{cls}: {name} = {v!r}; expected one of {', '.join(repr(c) for c in choices)}")
    return v
