"""Hand-worked cases for finetune.metrics; each expected number is derived in a comment."""

from __future__ import annotations

import pytest

from finetune.metrics import (
    anls_star,
    conforms,
    donut_flatten,
    donut_normalize,
    field_changes,
    field_f1,
    field_outcomes,
    field_prf,
    json_exact_match,
    per_field_accuracy,
    schema_from_skeleton,
    score,
    ted_accuracy,
)

BOTH = ("strict", "normalized")


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("mode", BOTH)
def test_key_order_is_ignored(mode):
    assert json_exact_match({"b": 2, "a": {"y": 1, "x": 2}}, {"a": {"x": 2, "y": 1}, "b": 2}, mode)


def test_whitespace():
    # strict trims the outside only; normalized also collapses inner runs (newline, tabs, double spaces).
    assert json_exact_match({"n": "  Hans Müller\n"}, {"n": "Hans Müller"}, "strict")
    assert not json_exact_match({"n": "Hans  Müller"}, {"n": "Hans Müller"}, "strict")
    assert json_exact_match({"n": "Hans \t\n Müller"}, {"n": "Hans Müller"}, "normalized")
    assert not json_exact_match({"n": "HansMüller"}, {"n": "Hans Müller"}, "normalized")


def test_numbers_and_numeric_strings():
    assert json_exact_match({"t": 1}, {"t": 1.0}, "strict")  # same value, int vs float is fine
    assert not json_exact_match({"t": "12.50"}, {"t": 12.5}, "strict")  # string vs number
    assert not json_exact_match({"t": "1"}, {"t": 1}, "strict")
    assert json_exact_match({"t": "12.50"}, {"t": 12.5}, "normalized")
    assert json_exact_match({"t": " 12.5 "}, {"t": "12.50"}, "normalized")
    assert not json_exact_match({"t": "12.51"}, {"t": 12.5}, "normalized")
    # "inf"/"nan" are not numeric: they stay strings, so "inf" != "Infinity" although float() equates them.
    assert not json_exact_match({"t": "inf"}, {"t": "Infinity"}, "normalized")
    assert json_exact_match({"t": "nan"}, {"t": "nan"}, "normalized")


@pytest.mark.parametrize("mode", BOTH)
def test_nested_objects(mode):
    gold = {"a": {"b": [1, {"c": "x", "d": None}]}}
    assert json_exact_match({"a": {"b": [1, {"d": None, "c": "x"}]}}, gold, mode)
    assert not json_exact_match({"a": {"b": [1, {"c": "y", "d": None}]}}, gold, mode)


@pytest.mark.parametrize("mode", BOTH)
def test_lists_keep_order_and_length(mode):
    assert json_exact_match({"l": ["x", "y"]}, {"l": ["x", "y"]}, mode)
    assert not json_exact_match({"l": ["y", "x"]}, {"l": ["x", "y"]}, mode)
    assert not json_exact_match({"l": ["x", "y", "z"]}, {"l": ["x", "y"]}, mode)
    assert not json_exact_match({"l": ["x"]}, {"l": ["x", "y"]}, mode)


def test_missing_and_extra_keys():
    gold = {"a": 1, "b": "x"}
    for mode in BOTH:
        assert not json_exact_match({"a": 1}, gold, mode)  # missing key with a value
        assert not json_exact_match({"a": 1, "b": "x", "c": 2}, gold, mode)  # extra key with a value
    # Only normalized treats a missing key like null.
    assert not json_exact_match({"a": 1, "b": "x", "c": None}, gold, "strict")
    assert json_exact_match({"a": 1, "b": "x", "c": None}, gold, "normalized")


def test_null_empty_string_and_missing_key():
    assert not json_exact_match({"a": None}, {"a": ""}, "strict")
    assert json_exact_match({"a": None}, {"a": None}, "strict")
    plain, with_null, with_empty = {"b": 1}, {"a": None, "b": 1}, {"a": "", "b": 1}
    assert json_exact_match(with_null, plain, "normalized")
    assert json_exact_match(plain, with_empty, "normalized")
    assert json_exact_match(with_empty, with_null, "normalized")
    assert json_exact_match({"a": "   ", "b": 1}, plain, "normalized")  # whitespace collapses to ""
    # In a list null and "" are alike but keep their slot; {} is not null.
    assert json_exact_match({"l": [None, "a"]}, {"l": ["", "a"]}, "normalized")
    assert not json_exact_match({"l": [None]}, {"l": []}, "normalized")
    assert not json_exact_match({"a": {}, "b": 1}, plain, "normalized")


@pytest.mark.parametrize("mode", BOTH)
def test_unicode(mode):
    assert json_exact_match({"n": "Müller", "c": "東京"}, {"c": "東京", "n": "Müller"}, mode)
    assert not json_exact_match({"n": "Muller"}, {"n": "Müller"}, mode)
    # Decomposed u + combining diaeresis is left as is: it does not equal the precomposed ü.
    assert not json_exact_match({"n": "Mu\u0308ller"}, {"n": "M\u00fcller"}, mode)


@pytest.mark.parametrize("mode", BOTH)
def test_bool_is_not_int(mode):
    assert json_exact_match({"p": True}, {"p": True}, mode)
    assert not json_exact_match({"p": True}, {"p": 1}, mode)
    assert not json_exact_match({"p": False}, {"p": 0}, mode)
    assert not json_exact_match({"p": "true"}, {"p": True}, mode)


@pytest.mark.parametrize("mode", BOTH)
def test_unparseable_prediction_never_matches(mode):
    assert not json_exact_match(None, {}, mode)
    assert not json_exact_match(None, None, mode)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError):
        json_exact_match({}, {}, "fuzzy")


# --------------------------------------------------------------------------- Donut normalisation and F1


def test_donut_normalisation_quirks():
    data = {"bb": [1, True, " ", 2.5, [3]], "a": 0, "c": False, "dd": {"x": ""}, "e": " v ", "f": {"g": 1.0}}
    # a=0, c=False are falsy -> dropped; dd's only child is "" -> {} -> dropped; bool, " " and [3] leave the
    # scalar list; nested dict f becomes a one-item list; 1.0 stays "1.0"; keys sorted by (len, key).
    assert donut_normalize(data) == {"e": ["v"], "f": [{"g": ["1.0"]}], "bb": ["1", "2.5"]}
    assert list(donut_normalize(data)) == ["e", "f", "bb"]
    assert donut_flatten(donut_normalize(data)) == [("e", "v"), ("f.g", "1.0"), ("bb", "1"), ("bb", "2.5")]


def test_field_prf_two_samples():
    golds = [
        {"name": "Müller", "total": "12.50"},
        {"city": "東京", "items": [{"n": "a"}, {"n": "b"}]},
    ]
    predictions = [
        {"total": "12.5", "name": "Müller"},  # name TP; "12.5" != "12.50" (string match) -> 1 FP + 1 FN
        {"city": "東京", "items": [{"n": "b"}]},  # city TP, items.n=b TP, items.n=a missed -> 1 FN
    ]
    # tp=3, fp=1, fn=2: precision 3/4, recall 3/5, F1 = 3 / (3 + 3/2) = 2/3.
    result = field_prf(predictions, golds)
    assert (result["tp"], result["fp"], result["fn"]) == (3, 1, 2)
    assert result["precision"] == pytest.approx(0.75)
    assert result["recall"] == pytest.approx(0.6)
    assert result["f1"] == pytest.approx(2 / 3)


def test_field_prf_without_fields_and_with_unparseable():
    assert field_prf([None], [{}])["f1"] == 0.0  # no fields at all: guarded, not a ZeroDivisionError
    result = field_prf([None], [{"a": "x", "b": "y"}])  # None counts as {}: both gold fields missed
    assert (result["tp"], result["fp"], result["fn"], result["f1"]) == (0, 0, 2, 0.0)


# --------------------------------------------------------------------------- nTED


def test_ted_one_character_typo():
    # Gold tree <root> -> a -> <leaf>abcd costs 1 (node a) + 4 (leaf text) to build from an empty root.
    # The typo d->e is one leaf update of Levenshtein distance 1: accuracy = 1 - 1/5.
    assert ted_accuracy({"a": "abce"}, {"a": "abcd"}) == pytest.approx(0.8)


def test_ted_empty_perfect_and_unparseable():
    gold = {"a": "abcd", "b": [{"c": "x"}]}
    assert ted_accuracy({}, gold) == 0.0  # TED equals the normaliser itself
    assert ted_accuracy(None, gold) == 0.0
    assert ted_accuracy({"b": [{"c": "x"}], "a": "abcd"}, gold) == 1.0


def test_ted_scalar_list_order_matters():
    # Gold <root> -> a -> (<leaf>x, <leaf>y) costs 1 + 1 + 1 = 3. Swapped leaves need two 1-char edits: 1 - 2/3.
    assert ted_accuracy({"a": ["y", "x"]}, {"a": ["x", "y"]}) == pytest.approx(1 / 3)


def test_ted_empty_gold_is_undefined():
    # TED({}, gold) = 0 when the gold normalises to empty: Donut's ratio is 0/0 (or x/0), undefined for any valid
    # prediction, empty or not; an invalid prediction still scores 0.
    assert ted_accuracy({}, {"a": ""}) is None  # both normalise to empty
    assert ted_accuracy({"a": "x"}, {}) is None
    assert ted_accuracy(None, {}) == 0.0


# --------------------------------------------------------------------------- ANLS*


def test_anls_star():
    assert anls_star({"a": "abcd"}, {"a": "abcd"}) == 1.0
    # One edit over 4 characters: 1 - 1/4 = 0.75.
    typo = anls_star({"a": "abce"}, {"a": "abcd"})
    assert 0.5 < typo < 1.0
    assert typo == pytest.approx(0.75)
    assert anls_star(None, {"a": "x"}) == 0.0
    assert anls_star({}, {}) == 1.0


# --------------------------------------------------------------------------- per-field accuracy


def test_per_field_accuracy():
    golds = [{"name": "A", "items": [{"n": "x"}, {"n": "y"}]}, {"name": "B"}]
    predictions = [{"name": "A", "items": [{"n": "y"}, {"n": "x"}]}, {"name": "C"}]
    # name: right in sample 1 only -> 1/2. items.n: only in gold 1, same values once sorted -> 1/1.
    assert per_field_accuracy(predictions, golds) == {"items.n": 1.0, "name": 0.5}
    assert per_field_accuracy([None], [{"name": "A"}]) == {"name": 0.0}


# --------------------------------------------------------------------------- per-field outcomes


def _counts(**nonzero: int) -> dict[str, int]:
    return {"right": 0, "wrong": 0, "missed": 0, "hallucinated": 0, "empty": 0, **nonzero}


def test_field_outcomes_each_outcome():
    golds = [{"name": "A", "total": "5", "note": ""}, {"name": "B", "total": None}]
    predictions = [{"name": "A", "total": "6", "note": "hi"}, {"total": "7", "extra": "e"}]
    # Sample 1: name right, total wrong, note filled against a gold "" (hallucinated).
    # Sample 2: name missed, total filled against a gold null, extra invented. No gold fills note or extra, so they
    # are counted only where predicted; no empty outcome anywhere, as every known field is filled by some side.
    assert field_outcomes(predictions, golds) == {
        "extra": _counts(hallucinated=1),
        "name": _counts(right=1, missed=1),
        "note": _counts(hallucinated=1),
        "total": _counts(wrong=1, hallucinated=1),
    }
    with pytest.raises(ValueError):
        field_outcomes([{}], [])


def test_field_outcomes_a_field_some_gold_fills_is_counted_in_every_sample():
    golds = [{"a": "1", "b": "2"}, {"a": "3"}, {"a": "4", "b": ""}]
    predictions = [{"a": "1", "b": "2"}, {"a": "3"}, {"a": "4", "b": "9"}]
    outcomes = field_outcomes(predictions, golds)
    # b: right in 1, correctly left empty in 2 (gold lacks it), filled against a gold "" in 3.
    assert outcomes == {"a": _counts(right=3), "b": _counts(right=1, empty=1, hallucinated=1)}
    assert all(sum(c.values()) == len(golds) for c in outcomes.values())


def test_field_outcomes_list_items_share_their_parents_path():
    golds = [
        {"items": [{"n": "x"}, {"n": "y"}, {"q": "1"}]},
        {"items": [{"n": "x"}, {"n": "y"}]},
    ]
    predictions = [
        {"items": [{"n": "y"}, {"n": "x"}, {"q": "2"}, {"p": "3"}]},  # n: same values in another order
        {"items": [{"n": "x"}]},  # n: one of two values: wrong, not right
    ]
    assert field_outcomes(predictions, golds) == {
        "items.n": _counts(right=1, wrong=1),
        "items.p": _counts(hallucinated=1),
        "items.q": _counts(wrong=1, empty=1),  # sample 2: neither side has a q
    }


def test_field_outcomes_null_empty_and_donut_falsy_golds_should_stay_empty():
    skeleton = {"a": "", "b": "", "c": 0, "d": [], "e": ""}
    gold = {"a": None, "b": "", "c": 0, "d": [], "e": "  "}
    prediction = {"a": "x", "b": "y", "c": 0, "d": ["z"], "e": "w"}
    # a, b, d: gold has nothing, prediction fills them. c: Donut drops a 0 on both sides: correctly empty.
    # e: Donut keeps a whitespace-only string (as "", being truthy before the strip): a gold value, so "w" is wrong.
    assert field_outcomes([prediction], [gold], skeleton) == {
        "a": _counts(hallucinated=1),
        "b": _counts(hallucinated=1),
        "c": _counts(empty=1),
        "d": _counts(hallucinated=1),
        "e": _counts(wrong=1),
    }


def test_field_outcomes_invalid_prediction_has_no_values():
    outcomes = field_outcomes([None], [{"a": "1", "b": ""}], {"a": "", "b": ""})
    assert outcomes == {"a": _counts(missed=1), "b": _counts(empty=1)}


def test_field_outcomes_skeleton_only_paths_count_as_empty():
    skeleton = {"name": "", "addr": {"city": ""}, "items": [{"n": "", "q": 0}], "tags": []}
    assert field_outcomes([{"name": "A"}], [{"name": "A"}], skeleton) == {
        "addr.city": _counts(empty=1),
        "items.n": _counts(empty=1),
        "items.q": _counts(empty=1),
        "name": _counts(right=1),
        "tags": _counts(empty=1),
    }
    assert list(field_outcomes([{}], [{}], skeleton)) == ["addr.city", "items.n", "items.q", "name", "tags"]


def test_hallucinated_and_missed_field_rates_in_score():
    golds = [{"a": "1", "b": ""}, {"a": "2"}, {"a": "4"}]
    predictions = [{"a": "1", "b": "x"}, {"a": "3"}, None]
    metrics, _ = score(golds, predictions, skeleton={"a": "", "b": ""})
    # a: right, wrong, missed (invalid). b: hallucinated, empty, empty.
    assert metrics["per_field"] == {"a": _counts(right=1, wrong=1, missed=1), "b": _counts(hallucinated=1, empty=2)}
    assert metrics["hallucinated_field_rate"] == pytest.approx(1 / 3)  # 1 of the 3 should-be-empty fields filled
    assert metrics["missed_field_rate"] == pytest.approx(1 / 3)  # 1 of the 3 gold-filled fields left empty
    # Without the skeleton no gold fills b: it is counted only where predicted, so no empty b to set against it.
    metrics, _ = score(golds, predictions)
    assert metrics["per_field"]["b"] == _counts(hallucinated=1) and metrics["hallucinated_field_rate"] == 1.0
    metrics, _ = score([{"a": "1"}], [{"a": "1"}], skeleton={"a": "", "b": ""})
    assert metrics["hallucinated_field_rate"] == 0.0 and metrics["missed_field_rate"] == 0.0
    metrics, _ = score([], [])
    assert metrics["per_field"] == {} and metrics["hallucinated_field_rate"] == metrics["missed_field_rate"] == 0.0


def test_field_changes_between_two_runs_on_the_same_samples():
    golds = [{"a": "1", "b": ""}, {"a": "2", "b": ""}]
    before, _ = score(golds, [{"a": "1", "b": "x", "c": "z"}, {"a": "2", "b": "y"}])
    after, _ = score(golds, [{"a": "1"}, {"b": "y"}])
    # before: a right 2; b hallucinated 2 (no gold fills b: only predicted paths); c hallucinated 1.
    # after: a right 1, missed 1; b hallucinated 1 (sample 2); c gone.
    changes = field_changes(before, after)
    assert list(changes) == ["a", "b", "c"]
    assert changes["a"] == {**_counts(right=-1, missed=1), "accuracy": pytest.approx(-0.5), "hallucination": None}
    # b: no empty outcome (not in the set's golds), so the rate is 1.0 on both sides: no change, and no accuracy.
    assert changes["b"] == {**_counts(hallucinated=-1), "accuracy": None, "hallucination": 0.0}
    # c: only before; after it counts zeros, its hallucination rate undefined there.
    assert changes["c"] == {**_counts(hallucinated=-1), "accuracy": None, "hallucination": None}

    skeleton = {"a": "", "b": ""}
    before, _ = score(golds, [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}], skeleton=skeleton)
    after, _ = score(golds, [{"a": "1"}, {"a": "2", "b": "y"}], skeleton=skeleton)
    assert field_changes(before, after)["b"] == {
        **_counts(hallucinated=-1, empty=1),
        "accuracy": None,
        "hallucination": pytest.approx(-0.5),  # 2/2 filled -> 1/2
    }
    assert field_changes(before, before)["a"] == {**_counts(), "accuracy": 0.0, "hallucination": None}
    with pytest.raises(ValueError, match="same samples"):
        field_changes(before, score(golds[:1], [{}])[0])
    with pytest.raises(ValueError, match="per_field"):
        field_changes({"num_samples": 2}, after)


# --------------------------------------------------------------------------- schema


SKELETON = {"name": "", "total": 0, "paid": False, "items": [{"n": "", "q": 0}], "tags": [], "addr": {"city": ""}}


def test_schema_from_skeleton_shape():
    schema = schema_from_skeleton(SKELETON)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == list(SKELETON)
    props = schema["properties"]
    assert props["name"] == {"type": ["string", "null"]}
    assert props["total"] == {"type": ["number", "null"]}
    assert props["paid"] == {"type": ["boolean", "null"]}
    assert props["items"]["items"]["required"] == ["n", "q"]
    # An empty list in the skeleton: items never seen, so any scalar (bounded, unlike arbitrary nested JSON).
    assert props["tags"] == {"type": "array", "items": {"type": ["string", "number", "boolean", "null"]}}


def test_conforms():
    schema = schema_from_skeleton(SKELETON)
    good = {
        "name": None,
        "total": 3,
        "paid": True,
        "items": [{"n": "a", "q": 1.5}],
        "tags": [1, "x"],
        "addr": {"city": "東京"},
    }
    assert conforms(good, schema)
    assert conforms({**good, "total": None, "items": []}, schema)
    assert not conforms({k: v for k, v in good.items() if k != "name"}, schema)  # missing required key
    assert not conforms({**good, "extra": 1}, schema)  # additionalProperties false
    assert not conforms({**good, "total": "3"}, schema)  # string for number
    assert not conforms({**good, "total": True}, schema)  # boolean is not a number
    assert not conforms({**good, "items": [{"n": "a"}]}, schema)  # nested required
    assert not conforms({**good, "addr": {"city": "x", "zip": "1"}}, schema)  # nested extra key
    assert not conforms(None, schema)


def test_schema_refined_by_the_training_targets_accepts_the_targets_themselves():
    """The skeleton is the union of all targets' keys and their first-seen types; the targets tell which keys are
    optional, which types occur and where containers may be null."""
    targets = [
        {"a": "x", "tax": None},
        {"a": "y", "tax": 3.5, "note": "n", "items": [{"q": 1}]},
        {"a": "z", "items": None},
    ]
    skeleton = {"a": "", "tax": "", "note": "", "items": [{"q": 0}]}
    schema = schema_from_skeleton(skeleton, targets)
    assert all(conforms(t, schema) for t in targets)
    assert not any(conforms(t, schema_from_skeleton(skeleton)) for t in targets)  # the skeleton alone rejects them
    assert schema["required"] == ["a"]
    assert schema["properties"]["tax"] == {"type": ["number", "null"]}  # a null first, a number later
    assert schema["properties"]["items"]["type"] == ["array", "null"]
    assert not conforms({"a": "x", "tax": "3.5"}, schema) and not conforms({"tax": 1}, schema)


# --------------------------------------------------------------------------- score()


def test_score_aggregates():
    golds = [{"a": "1", "b": "x"}, {"a": "2"}, {"a": "3"}]
    predictions = [{"b": "x", "a": "1"}, {"a": 2}, None]
    metrics, samples = score(golds, predictions, skeleton={"a": "", "b": ""})
    # Sample 1 matches both ways; sample 2 only normalized ("2" vs 2); sample 3 is unparseable.
    assert [s["exact_match_strict"] for s in samples] == [True, False, False]
    assert [s["exact_match_normalized"] for s in samples] == [True, True, False]
    assert metrics["json_exact_match"] == pytest.approx(1 / 3)
    assert metrics["json_exact_match_strict"] == pytest.approx(1 / 3)
    assert metrics["json_exact_match_normalized"] == pytest.approx(2 / 3)
    assert metrics["headline"] == "strict"
    # Fields: 2 + 1 TP (Donut compares str(2) == "2"), 0 FP, 1 FN -> P 1, R 3/4, F1 3 / 3.5 = 6/7.
    assert metrics["field_precision"] == 1.0
    assert metrics["field_recall"] == pytest.approx(0.75)
    assert metrics["field_f1"] == pytest.approx(6 / 7)
    assert [s["field_f1"] for s in samples] == [1.0, 1.0, 0.0]
    assert metrics["ted_accuracy"] == pytest.approx(2 / 3)  # 1, 1, 0
    assert metrics["anls_star"] == pytest.approx(2 / 3)  # 1, 1 (str(2) == "2"), 0
    assert metrics["valid_json_rate"] == pytest.approx(2 / 3)
    # Sample 2 misses required "b" and has a number for a string: only sample 1 conforms.
    assert [s["schema_valid"] for s in samples] == [True, False, False]
    assert metrics["schema_conformance_rate"] == pytest.approx(1 / 3)
    assert metrics["num_samples"] == 3
    assert metrics["per_field_accuracy"] == {"a": pytest.approx(2 / 3), "b": 1.0}


def test_score_headline_and_without_skeleton():
    metrics, samples = score([{"a": "2"}], [{"a": 2}], headline="normalized")
    assert metrics["headline"] == "normalized" and metrics["json_exact_match"] == 1.0
    assert samples[0]["exact_match"] is True
    assert "schema_conformance_rate" not in metrics and "schema_valid" not in samples[0]
    # Both sides without fields: the sample's own F1 is undefined (0/0), the dataset F1 is 0.0 (no fields at all).
    metrics, samples = score([{}], [{}])
    assert samples[0]["field_f1"] is None and metrics["field_f1"] == 0.0 and metrics["field_f1_undefined"] == 1
    with pytest.raises(ValueError):
        score([{}], [{}], headline="fuzzy")
    with pytest.raises(ValueError):
        score([{}], [])


def test_score_empty_input():
    metrics, samples = score([], [], skeleton={"a": ""})
    assert samples == []
    assert metrics["num_samples"] == 0
    for key in (
        "json_exact_match",
        "field_f1",
        "ted_accuracy",
        "anls_star",
        "valid_json_rate",
        "schema_conformance_rate",
    ):
        assert metrics[key] == 0.0
    assert metrics["per_field_accuracy"] == {}


# --------------------------------------------------------------------------- invalid predictions, undefined pairs

EMPTY_GOLDS = [{}, [], "", {"a": ""}, {"a": None}, {"a": []}, None, 0, False]


@pytest.mark.parametrize("gold", [*EMPTY_GOLDS, {"a": "x"}, [{"a": "x"}], "x"])
def test_invalid_prediction_scores_zero_on_every_metric(gold):
    assert ted_accuracy(None, gold) == 0.0
    assert anls_star(None, gold) == 0.0  # the package alone scores {} vs an empty gold 1.0
    assert field_f1(None, gold) == 0.0
    for mode in BOTH:
        assert json_exact_match(None, gold, mode) is False
    assert all(v == 0.0 for v in per_field_accuracy([None], [gold]).values())
    metrics, (sample,) = score([gold], [None], skeleton={"a": ""})
    per_sample = ("exact_match", "exact_match_strict", "exact_match_normalized", "field_f1", "ted_accuracy")
    for key in (*per_sample, "anls_star", "schema_valid", "valid_json"):
        assert sample[key] is not None and float(sample[key]) == 0.0, key
    for key in (
        "json_exact_match",
        "json_exact_match_strict",
        "json_exact_match_normalized",
        "field_precision",
        "field_recall",
        "field_f1",
        "ted_accuracy",
        "anls_star",
        "valid_json_rate",
        "schema_conformance_rate",
    ):
        assert metrics[key] == 0.0, key
    # An invalid prediction is never "undefined": it is counted as a 0, not dropped from the mean.
    assert metrics["field_f1_undefined"] == metrics["ted_accuracy_undefined"] == 0


@pytest.mark.parametrize("gold", EMPTY_GOLDS)
def test_valid_prediction_against_an_empty_gold(gold):
    # nTED: TED({}, gold) = 0, undefined whatever the prediction. Field F1: undefined only when neither side has a
    # field; a predicted field against no gold field is an FP, F1 0.
    assert ted_accuracy({}, gold) is None and ted_accuracy({"k": "v"}, gold) is None
    assert field_f1({}, gold) is None and field_f1({"k": "v"}, gold) == 0.0
    assert anls_star({"k": "v"}, gold) < 1.0  # always defined


def test_empty_prediction_for_empty_gold_is_an_exact_match():
    metrics, (sample,) = score([{}], [{}])
    assert sample["exact_match_strict"] is True and sample["exact_match_normalized"] is True
    assert metrics["json_exact_match"] == 1.0
    assert sample["anls_star"] == 1.0 and metrics["anls_star"] == 1.0  # ANLS* defines it
    assert sample["ted_accuracy"] is None and sample["field_f1"] is None
    assert metrics["ted_accuracy_undefined"] == metrics["field_f1_undefined"] == 1
    assert metrics["ted_accuracy"] == 0.0  # no defined pair: reported as 0.0, with the count saying why


def test_undefined_pairs_are_counted_and_left_out_of_the_mean():
    golds = [{"a": "abcd"}, {"a": "abcd"}, {}, {"a": ""}, {}, {}]
    predictions = [
        {"a": "abcd"},  # nTED 1, F1 1
        {"a": "abce"},  # nTED 1 - 1/5 = 0.8 (test_ted_one_character_typo), F1 0 (1 FP, 1 FN)
        {},  # empty gold: nTED undefined; no fields either side: F1 undefined
        {"b": "x"},  # empty gold: nTED undefined; F1 0 (1 FP)
        None,  # invalid: 0 on both, not undefined
        {},  # undefined on both again
    ]
    metrics, samples = score(golds, predictions)
    assert [s["ted_accuracy"] for s in samples] == [1.0, pytest.approx(0.8), None, None, 0.0, None]
    assert [s["field_f1"] for s in samples] == [1.0, 0.0, None, 0.0, 0.0, None]
    # Mean over the three defined pairs (1, 0.8, 0); averaging the undefined ones in as 1.0 would give 4.8 / 6.
    assert metrics["ted_accuracy"] == pytest.approx(1.8 / 3)
    assert metrics["ted_accuracy_undefined"] == 3
    assert metrics["field_f1_undefined"] == 2
    # Micro F1: tp 1, fp 2 (abce, b=x), fn 1 (abcd) -> 1 / (1 + 3/2) = 0.4; the undefined pairs add no counts.
    assert metrics["field_f1"] == pytest.approx(0.4)
    assert metrics["json_exact_match"] == pytest.approx(3 / 6)  # samples 1, 3 and 6: {} == {} is a match
    assert metrics["num_samples"] == 6


def test_score_is_json_serialisable_with_undefined_pairs():
    import json

    metrics, samples = score([{}], [{}])
    assert json.loads(json.dumps(samples))[0]["ted_accuracy"] is None  # null, not NaN (not valid JSON)
    assert json.loads(json.dumps(metrics, allow_nan=False))["ted_accuracy_undefined"] == 1
