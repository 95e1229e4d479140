"""Every MoE family of the installed transformers has an adapter and an exactness test.

A family is an MoE family when one of its models declares ``router_logits`` in
``_can_record_outputs`` (72 of them in transformers 5.23.0). The exactness tests are
``tests/test_families_exact.py`` (the standard router triple) and
``tests/test_families_special.py`` (every other router shape).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Set

import pytest
import transformers
import transformers.models

import moewatch
import test_families_exact as exact
import test_families_special as special


def moe_families() -> Set[str]:
    """Families whose modeling module has a model class recording ``router_logits``."""
    from transformers.modeling_utils import PreTrainedModel

    root = Path(transformers.models.__file__).parent
    found = set()
    for info in pkgutil.iter_modules([str(root)]):
        source = root / info.name / f"modeling_{info.name}.py"
        # cheap pre-filter on the text; the class attribute below is what decides
        if not source.exists() or "router_logits" not in source.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            record = getattr(cls, "_can_record_outputs", None)
            if issubclass(cls, PreTrainedModel) and isinstance(record, dict) and "router_logits" in record:
                found.add(info.name)
                break
    return found


@pytest.fixture(scope="module")
def families() -> Set[str]:
    return moe_families()


def _family_params(module) -> Set[str]:
    """The union of every ``family`` parametrisation of the tests in ``module``."""
    values: Set[str] = set()
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_"):
            continue
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] == "family":
                values |= set(mark.args[1])
    return values


def test_enumeration_finds_the_moe_families(families):
    if transformers.__version__ == "5.23.0":
        assert len(families) == 72, sorted(families)
    assert {"mixtral", "switch_transformers", "deepseek_v4", "doge"} <= families


def test_every_family_has_an_adapter(families):
    missing = families - set(moewatch.supported_families())
    assert not missing, f"no adapter for {sorted(missing)}"


def test_every_family_has_an_exactness_test(families):
    standard, other = _family_params(exact), _family_params(special)
    assert standard and other  # the exactness tests are parametrised by family
    assert set(special.FAMILY_LIST) <= other
    missing = families - standard - other
    assert not missing, f"no exactness test for {sorted(missing)}"
