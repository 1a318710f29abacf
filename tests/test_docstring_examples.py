"""The ``Example::`` blocks of the public docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import normkit
import normkit.nn

# illustrative, not run: normkit.conversion's examples need a Hugging Face model built from a config,
# SyncBatchNorm's an initialized process group
NOT_RUN = {"normkit.nn.sync_batchnorm"}
MODULES = ["normkit.functional"] + [
    name for m in pkgutil.iter_modules(normkit.nn.__path__) if (name := f"normkit.nn.{m.name}") not in NOT_RUN
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "normkit": normkit}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_examples_are_found():
    found = sum(doctest.testmod(importlib.import_module(n), extraglobs={"torch": torch, "normkit": normkit},
                                optionflags=doctest.ELLIPSIS).attempted for n in MODULES)
    assert found >= 20
