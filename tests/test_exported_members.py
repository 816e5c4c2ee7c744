"""The public surface is a decision: this pins it."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import flux_async


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, its names exist, and each public one is documented with an example."""
    names = flux_async.__all__

    # isort-style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions.
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert names == sorted(names, key=kind)
    for name in names:
        obj = getattr(flux_async, name)
        if callable(obj) and not isinstance(obj, str):
            assert obj.__doc__, f"{name} has no docstring"
            assert "Example" in obj.__doc__ or name.isupper(), f"{name} docstring has no example"
    # `isidentifier`: pytest 9.2 gives the package it loads a plugin from the names its
    # assertion rewriting adds ("@py_builtins"), which no one can import as API.
    public = {n for n in dir(flux_async) if not n.startswith("_") and n.isidentifier()}
    # Submodules: the emulator, and the test helpers the pytest plugin (loaded by the
    # pytest11 entry point in any pytest run) imports.
    assert public - set(names) <= {"emulator", "pytest_plugin", "redis", "testing"}


def test_every_public_name_is_in_the_api_reference() -> None:
    """docs/reference/api.md names each name of __all__ (a rendered entry or the text)."""
    page = (Path(__file__).parent.parent / "docs" / "reference" / "api.md").read_text("utf-8")
    missing = [
        name
        for name in flux_async.__all__
        if f"::: flux_async.{name}\n" not in page and f"`{name}`" not in page
    ]
    assert missing == []


@pytest.mark.parametrize(
    "module_name", ["flux_async", "flux_async.redis", "flux_async.testing", "flux_async.emulator"]
)
def test_every_public_member_has_an_example(module_name: str) -> None:
    """Each public method and property a public class defines itself has a docstring
    with an ``Example::``, as its class has (exception classes aside)."""
    if module_name == "flux_async.redis":
        pytest.importorskip("redis")  # the extra; without it the module cannot import
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        cls = getattr(module, name)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, property):
                function = value.fget
            elif callable(value) or isinstance(value, staticmethod | classmethod):
                function = getattr(value, "__func__", value)
            else:
                continue  # a constant or field
            if "Example" not in (inspect.getdoc(function) or ""):
                missing.append(f"{module_name}.{name}.{attr}")
    assert missing == []
