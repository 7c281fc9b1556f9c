"""Every example in a public docstring runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import keras_gemma

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(keras_gemma.__path__, "keras_gemma.")
    if not info.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
