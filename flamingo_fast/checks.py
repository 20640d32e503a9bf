"""The one integer check: every option and count that must be a whole number >= n goes through `check_int`, so
the rule (a Python int, never a bool) and the error's wording are written once. The lowest module of the package:
config.py and validation.py both use it."""

from __future__ import annotations


def is_int(value) -> bool:
    """A Python int that is not a bool (True is an int to isinstance, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, note: str = "") -> int:
    """`value` if it is an integer >= minimum (not a bool), else a ValueError naming `name`, the value and what was
    expected (`note`: appended to the expectation, e.g. " (0 disables it)")."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}{note}")
    return value
