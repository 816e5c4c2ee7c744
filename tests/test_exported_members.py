"""The public surface is a decision: this pins it."""

from __future__ import annotations

import flux_async


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, every name in it exists, and every public name is documented."""
    names = flux_async.__all__
    assert names == sorted(names)
    for name in names:
        obj = getattr(flux_async, name)
        if callable(obj) and not isinstance(obj, str):
            assert obj.__doc__, f"{name} has no docstring"
            assert "Example" in obj.__doc__ or name.isupper(), f"{name} docstring has no example"
    public = {n for n in dir(flux_async) if not n.startswith("_")}
    assert public - set(names) <= {"emulator"}
