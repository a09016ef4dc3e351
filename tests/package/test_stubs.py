"""The native module's typed surface: a generated `_core.pyi` that matches the build, a
`py.typed` marker, and a docstring with an example on every public native class and
function."""

import importlib.resources
import inspect

import pytest

from checks import ROOT, load_script
from twinflow import _core



def _stubgen():
    return load_script(".ci/stubgen.py")


def test_checked_in_stub_matches_the_built_module():
    stub = ROOT / "python" / "twinflow" / "_core.pyi"
    assert stub.read_text() == _stubgen().render(_core), "run `python .ci/stubgen.py` and commit the stub"


def test_the_package_ships_its_type_information():
    pkg = importlib.resources.files("twinflow")
    assert pkg.joinpath("py.typed").is_file()
    assert pkg.joinpath("_core.pyi").is_file()


def _public():
    for name in dir(_core):
        obj = getattr(_core, name)
        if name.startswith("_") or not (isinstance(obj, type) or callable(obj)):
            continue
        yield name, obj


@pytest.mark.parametrize("name", [n for n, _ in _public()])
def test_native_names_have_a_docstring_with_an_example(name):
    obj = getattr(_core, name)
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc and ">>>" in doc, f"_core.{name} needs a docstring with an example"
    if isinstance(obj, type):
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            assert inspect.getdoc(member), f"_core.{name}.{attr} has no docstring"


@pytest.mark.parametrize("name", [n for n, _ in _public()])
def test_native_docstring_examples_run(name):
    import doctest

    import torch

    import twinflow

    obj = getattr(_core, name)
    members = [obj] + ([m for a, m in vars(obj).items() if not a.startswith("_")] if isinstance(obj, type) else [])
    finder, runner = doctest.DocTestFinder(recurse=False), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # The examples are written as after `from twinflow._core import *`.
    globs = {"torch": torch, "twinflow": twinflow, "_core": _core,
             **{n: getattr(_core, n) for n in dir(_core) if not n.startswith("_")}}
    for member in members:
        for test in finder.find(member, f"_core.{name}", module=False, globs=dict(globs)):
            runner.run(test)
    assert runner.failures == 0, f"an example in _core.{name}'s docstrings fails (see the output above)"


def test_the_stub_types_every_member():
    """pyo3 records no types; .ci/stub_types.py gives them, so no return or property is `Any`."""
    text = (ROOT / "python" / "twinflow" / "_core.pyi").read_text()
    assert "-> Any" not in text and "*args: Any" not in text


def test_a_stale_types_table_is_refused(monkeypatch):
    gen = _stubgen()
    members = dict(gen.stub_types.MEMBERS)
    for broken, message in [
        ({k: v for k, v in members.items() if k != "Plan.rows"}, "Plan.rows: no entry"),
        ({**members, "Plan.gone": "int"}, "Plan.gone"),
        ({**members, "l2_loss": "(a: Tensor, b: Tensor) -> Tensor"}, "l2_loss: .ci/stub_types.py has parameters"),
    ]:
        monkeypatch.setattr(gen.stub_types, "MEMBERS", broken)
        with pytest.raises(gen.StaleTypes, match=message):
            gen.render(_core)
