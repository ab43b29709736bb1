"""Prompt skeletons in the model cards' style and canonical target serialisation."""

from __future__ import annotations

import json

from finetune.data.prompt import canonical_json, derive_skeleton, render_instruction


def test_skeleton_unions_keys_in_first_seen_order_and_empties_values():
    targets = [
        {"name": "Ann", "items": [{"qty": 2, "price": "1.00"}]},
        {"name": "Bob", "total": 3.5, "items": [{"qty": 1, "sku": "X"}], "paid": True, "note": None},
    ]
    skeleton = derive_skeleton(targets)
    assert skeleton == {
        "name": "",
        "items": [{"qty": 0, "price": "", "sku": ""}],
        "total": 0,
        "paid": False,
        "note": "",
    }
    assert list(skeleton) == ["name", "items", "total", "paid", "note"]


def test_instruction_in_model_card_style():
    text = render_instruction(
        "Extract the details from the form image and structure them into JSON format:",
        {"name": "", "items": [{"qty": 0}]},
    )
    assert text == (
        "Extract the details from the form image and structure them into JSON format: "
        '{"name": "", "items": [{"qty": 0}]}'
    )


def test_canonical_json_orders_like_skeleton_then_sorted_and_is_compact():
    skeleton = {"b": "", "a": "", "items": [{"y": "", "x": ""}]}
    target = {"zz": 1, "a": "Ä", "items": [{"x": "1", "y": "2", "w": "0"}], "b": "é", "c": None}
    text = canonical_json(target, skeleton)
    assert text == '{"b":"é","a":"Ä","items":[{"y":"2","x":"1","w":"0"}],"c":null,"zz":1}'
    assert json.loads(text) == target  # same object, only the order and spacing are canonical


def test_canonical_json_is_stable_whatever_the_input_order():
    skeleton = {"a": "", "b": ""}
    assert canonical_json({"b": 1, "a": 2}, skeleton) == canonical_json({"a": 2, "b": 1}, skeleton)


def test_exact_match_is_type_strict_but_ignores_key_order():
    from finetune.evaluation import json_exact_match, parse_json

    assert json_exact_match({"a": 1, "b": [1, {"c": "x"}]}, {"b": [1, {"c": "x"}], "a": 1})
    assert json_exact_match({"n": 1.0}, {"n": 1})  # one JSON number
    assert not json_exact_match({"n": True}, {"n": 1})
    assert not json_exact_match({"n": "1"}, {"n": 1})
    assert not json_exact_match({"a": None}, {"a": ""})
    assert not json_exact_match({"a": [1, 2]}, {"a": [2, 1]})
    assert not json_exact_match({"a": 1}, {"a": 1, "b": 2})
    assert parse_json(' {"a": 1}\n') == ({"a": 1}, True)
    assert parse_json('{"a": 1} trailing') == (None, False)
