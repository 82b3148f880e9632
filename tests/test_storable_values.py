"""What the executor stores of an answer: credentials masked, text every engine accepts.

Both checks take a fast path for the common answer (one pass of orjson over it) and walk
the value only when that pass finds something; these cases hold on either path.
"""

from __future__ import annotations

from typing import Any

import pytest

from bot.core.masking import MASK, mask_result
from bot.db.clean import REPLACEMENT, clean_value


@pytest.mark.parametrize(
    ("answer", "stored"),
    [
        ({"version": "v1", "labels": {}}, {"version": "v1", "labels": {}}),
        ({"Access_Token": "abc"}, {"Access_Token": MASK}),
        ({"x": [{"t_o-k_e_n": "abc"}]}, {"x": [{"t_o-k_e_n": MASK}]}),
        (
            {"clientSecret": "s", "PASSWORD": "p", "jwt": "j"},
            {"clientSecret": MASK, "PASSWORD": MASK, "jwt": MASK},
        ),
        ({"token": ""}, {"token": ""}),  # nothing to hide
        ({"token": 5}, {"token": 5}),  # not text
        ({"description": "rotate the token"}, {"description": "rotate the token"}),
        ({1: {"token": "abc"}}, {1: {"token": MASK}}),  # not plain JSON: walked
        ([{"refresh_token": "r"}], [{"refresh_token": MASK}]),
        ("token", "token"),
    ],
)
def test_credentials_are_masked_wherever_they_sit(answer: Any, stored: Any) -> None:
    assert mask_result(answer) == stored


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({"a": "plain", "b": [1, 2.5, None, True]}, {"a": "plain", "b": [1, 2.5, None, True]}),
        ({"a": "x\x00y"}, {"a": f"x{REPLACEMENT}y"}),
        ({"k\x00": ["\ud800"]}, {f"k{REPLACEMENT}": [REPLACEMENT]}),
        ({"a": "\\u0000 as text"}, {"a": "\\u0000 as text"}),  # a backslash, not a NUL
        ([("t\x00",)], [[f"t{REPLACEMENT}"]]),
        ({"n": 2**70, "s": "\x00"}, {"n": 2**70, "s": REPLACEMENT}),  # orjson refuses big ints
        ("\ud83d", REPLACEMENT),
    ],
)
def test_text_no_engine_stores_is_replaced(value: Any, stored: Any) -> None:
    assert clean_value(value) == stored
