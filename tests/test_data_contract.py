"""docs/data_contract.md stays true: it names every public function, and only key names that `bitro.Key` defines."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import bitro as bt

PAGE = Path(__file__).resolve().parents[1] / "docs" / "data_contract.md"
SUBPACKAGES = ("io", "pp", "tl", "pl")
#: Arguments whose string default is a key name the page must quote.
KEY_ARGS = re.compile(r"(_key|key_added|use_rep|layer|^key)$")


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def public_functions() -> list[tuple[str, str, object]]:
    out = []
    for sub in SUBPACKAGES:
        module = getattr(bt, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) or name == "Key" or not callable(obj):
                continue
            out.append((sub, name, obj))
    return out


def test_every_public_function_is_on_the_page(page):
    missing = [f"bt.{sub}.{name}" for sub, name, _ in public_functions() if f"bt.{sub}.{name}" not in page]
    if "bt.predict_slide" not in page:
        missing.append("bt.predict_slide")
    assert not missing, f"docs/data_contract.md does not cover {missing}"


def test_key_constants_exist_and_match_the_quoted_names(page):
    names = set(re.findall(r"`Key\.([A-Za-z_]\w*)", page))
    assert names, "the page names no Key constant"
    unknown = sorted(n for n in names if not hasattr(bt.Key, n))
    assert not unknown, f"docs/data_contract.md names Key constants that do not exist: {unknown}"
    # a quoted name right before its constant, e.g. .obsm["X_bitro"] (`Key.FEATURES`) or "{s}_spots" (`Key.SPOTS_SUFFIX`)
    wrong = []
    for quoted, name in re.findall(r'"([^"`]*)"\]?`? \(`Key\.([A-Z_]+)`', page):
        value = getattr(bt.Key, name)
        if isinstance(value, str) and not (quoted == value or quoted.endswith(value)):
            wrong.append(f'"{quoted}" (Key.{name} = {value!r})')
    assert not wrong, f"docs/data_contract.md quotes names that differ from their Key constant: {wrong}"


def test_default_key_names_are_on_the_page(page):
    """The string default of every key argument (``table_key``, ``key_added``, ``use_rep``, ...) is quoted."""
    missing = []
    for sub, name, func in [*public_functions(), ("", "predict_slide", bt.predict_slide)]:
        for param in inspect.signature(func).parameters.values():
            default = param.default
            if KEY_ARGS.search(param.name) and isinstance(default, str) and default:
                if f'"{default}"' not in page:
                    missing.append(f"bt.{sub}.{name}({param.name}={default!r})")
    assert not missing, f"docs/data_contract.md does not quote these defaults: {missing}"
