"""Public names that moved keep working, with a DeprecationWarning naming the new home."""

from __future__ import annotations

import importlib
import sys

import pytest

import lora_muon_jax as lmj


@pytest.mark.parametrize(
    "old,new,name",
    [
        ("lora_muon_jax.models", "lora_muon_jax_examples.char_lm", "CharTransformer"),
        ("lora_muon_jax.data", "lora_muon_jax_examples.tinyshakespeare", "load_tinyshakespeare"),
    ],
)
def test_moved_example_modules_reexport_with_a_warning(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("name", ["proxy_lr_search", "ProxyResult", "ProxyRow"])
def test_proxy_search_moved_to_the_examples_package(name):
    import lora_muon_jax_examples.proxy_lr as moved

    with pytest.warns(DeprecationWarning, match="lora_muon_jax_examples.proxy_lr"):
        assert getattr(lmj, name) is getattr(moved, name)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lmj.nonexistent  # noqa: B018


def test_eigh_method_name_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match='method="gram"'):
        lmj.lora_muon(0.1, method="eigh")
