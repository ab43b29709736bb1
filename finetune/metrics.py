"""Scores for generated JSON against gold JSON (image -> JSON extraction). Pure functions, no model code.

Every scorer takes already-parsed JSON values; a prediction of ``None`` means "the text was not valid JSON".

Invalid predictions and undefined pairs (the same rules in every per-sample scorer and in :func:`score`):

* A ``None`` (invalid-JSON) prediction scores 0 on every metric, whatever the gold (``{}``, ``[]``, ``""``
  included): it is never "undefined", so an unparseable output can never be rewarded, nor dropped from a mean.
* A metric that its published definition leaves undefined for a (valid prediction, gold) pair returns ``None``
  for that pair instead of a number. :func:`score` averages such a metric over the defined pairs only and reports
  how many pairs it left out as ``<metric>_undefined`` (an int, always present for ``field_f1`` and
  ``ted_accuracy``); with no defined pair at all the mean is reported as 0.0 (as for an empty dataset) and the
  count equals ``num_samples``.
* Which pairs are undefined: exact match never (always defined; a valid ``{}`` for a gold ``{}`` matches); field F1
  when neither side has a field after Donut's normalisation (``TP + FP + FN = 0``, 0/0); nTED accuracy when the gold
  normalises to empty (``TED({}, gold) = 0``, 0/0), whatever the prediction; ANLS* never (its reference
  implementation defines the empty-vs-empty case as 1.0); per-field accuracy only counts paths the gold has, and
  schema conformance is always defined.

Exact match (:func:`json_exact_match`), key order always ignored:

* ``strict``: equal JSON values. Types must agree (``true`` is not ``1``, ``"1"`` is not ``1``), but ``1 == 1.0``.
  Strings are compared after trimming outer whitespace only. Lists are compared in order, with equal length.
* ``normalized``: strings have runs of whitespace collapsed to one space and are trimmed. A string is numeric if,
  after that, ``float()`` accepts it and the value is finite (so "nan"/"inf" stay strings; note ``float()`` also
  accepts "1_000" and "1e3"). Numbers and numeric strings compare by value: ``"12.50" == 12.5 == "12.5"``.
  ``null``, ``""`` (or whitespace only) and a missing key are alike: ``{"a": null, "b": 1} == {"b": 1}``; inside a
  list, ``null`` and ``""`` are alike but still hold their position. An empty object ``{}`` or list ``[]`` is not
  ``null``. Lists are compared in order. Booleans equal only booleans.
* A ``None`` prediction never matches. Exact match is defined for every pair.

Donut metrics (Kim et al., "OCR-free Document Understanding Transformer", ``JSONParseEvaluator`` in
clovaai/donut ``donut/util.py``), reproduced with their quirks so numbers are comparable with published ones:

* Normalisation: a falsy value (None, "", 0, 0.0, False, [], {}) becomes ``{}`` and is dropped from its parent, so a
  gold ``0`` or ``false`` field does not exist for these metrics. Dict keys are sorted by ``(len(key), key)``. Every
  kept value becomes a list (a nested dict becomes ``[dict]``). A list whose items are all dicts is normalised item
  by item, dropping empty items. Any other list keeps ``str(item).strip()`` of its str/int/float items (``type()``
  check, so booleans, nested lists and dicts in a mixed list are dropped) when non-empty after stripping. Any other
  scalar becomes ``[str(value).strip()]`` (so ``True`` -> "True", ``1.0`` -> "1.0" which differs from ``1`` -> "1").
* Flatten: (dotted key path, string) pairs; list items share their parent's path, without indices.
* Field F1 (micro over a dataset): each predicted pair still present in the gold list is a TP and is removed from
  it, otherwise an FP; leftover gold pairs are FNs. ``F1 = TP / (TP + (FP + FN) / 2)``. Donut divides by zero when
  there are no fields at all; we return 0.0 for the dataset, and for a single sample (:func:`field_f1`) ``None``
  (undefined) for a valid prediction, 0.0 for an invalid one. An invalid prediction contributes its gold's fields
  as FNs to the dataset counts; against a gold without fields it adds nothing (micro F1 has no term for it: see
  ``valid_json_rate``).
* Tree: root ``<root>``; dict keys are child nodes labelled with the key; a list of dicts gives one ``<subtree>``
  child per item; a list of scalars gives one ``"<leaf>" + value`` node per item. A label is a leaf if it
  *contains* "<leaf>" (Donut's substring test). Insert/remove cost = len(text without "<leaf>") for a leaf, else 1.
  Update cost = Levenshtein distance between two leaves' texts, 1 + len(leaf text) between a leaf and a non-leaf,
  otherwise 0 for equal labels, else 1.
* nTED accuracy = ``max(0, 1 - TED(pred, gold) / TED({}, gold))``. When the gold normalises to empty,
  ``TED({}, gold) = 0`` and Donut divides by zero: the accuracy is undefined (``None``) for a valid prediction,
  whether or not it is empty too; an invalid prediction scores 0.0.

ANLS* (Peer et al., package ``anls_star``): ``anls_score(gold, pred)``. For dicts it averages over the union of keys;
a key missing from the prediction scores 1.0 only when the gold value is None (a gold "" or [] missing scores
0.5), and an extra predicted key lowers the average (an extra null key included). Strings are lowercased and
whitespace-collapsed, numbers compared via ``str()`` (so 12.5 vs "12.50" is a partial match), per-leaf similarity
below 0.5 counts 0, lists are matched order-free (Hungarian). Gold ``{}`` with prediction ``{}`` gives 1.0, gold
``{}`` with a non-empty prediction gives 0.0. A ``None`` prediction scores 0.0 (the package would score it as
``{}``, a perfect answer to an empty gold).

Per-field accuracy: per dotted path of the Donut-normalised gold, the share of samples (whose gold has the path)
whose sorted normalised values there equal the prediction's — with Donut's normalisation, so a gold ``false`` or
``0`` field is not scored. Schema conformance: against `finetune.schema` (skeleton refined by training targets).

Per-field outcomes (:func:`field_outcomes`, ``per_field`` in :func:`score`): per sample and dotted path exactly one of
``right`` / ``wrong`` (gold has values there; the prediction's sorted values equal them / differ), ``missed`` (gold
has values, prediction none), ``hallucinated`` (gold has none — missing, null, "", or anything Donut drops — but the
prediction has: filled but should be empty) and ``empty`` (neither has). Paths and values are Donut's (normalised,
list items share their parent's path); an invalid prediction has no values. A sample's paths: the skeleton's leaves,
every path some gold of the set fills, and the sample's own prediction paths; so a known field's counts sum to the
number of samples, and a key only some predictions invent counts only where predicted.
``hallucinated_field_rate`` = hallucinated / (hallucinated + empty): the share of should-be-empty fields the model
filled. ``missed_field_rate`` = missed / (right + wrong + missed): the share of gold-filled fields it left empty.
Both are 0.0 with a zero denominator. :func:`field_changes` compares two such counts on the same samples.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import zss
from anls_star import anls_score
from jsonschema import Draft202012Validator
from rapidfuzz.distance import Levenshtein

from finetune.schema import conforms, schema_from_skeleton  # noqa: F401  (part of this module's API)

EXACT_MATCH_MODES = ("strict", "normalized")
# The scoring rules' version, kept with a run's metrics (metrics.json): scores made under other rules are no yardstick
# for new ones. 1 (absent): before invalid predictions scored 0 everywhere and undefined pairs were left out of means.
METRICS_VERSION = 2
_WS = re.compile(r"\s+")
_MISSING = object()  # normalised-mode stand-in for null / "" / missing key


def _strict_equal(a: Any, b: Any) -> bool:
    # bool is a subclass of int in Python, so check it first: True must not equal 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a.strip() == b.strip()
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_strict_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(_strict_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a is None and b is None


def _normalize_loose(value: Any) -> Any:
    """Canonical form for the ``normalized`` mode; tags keep "1" (number) apart from True (bool)."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, str):
        text = _WS.sub(" ", value).strip()
        if not text:
            return _MISSING
        try:
            number = float(text)
        except ValueError:
            return ("str", text)
        return ("num", number) if math.isfinite(number) else ("str", text)
    if isinstance(value, dict):
        normed = {k: _normalize_loose(v) for k, v in value.items()}
        return {k: v for k, v in normed.items() if v is not _MISSING}
    if isinstance(value, list):
        return [_normalize_loose(v) for v in value]
    return ("other", value)


def json_exact_match(prediction: Any, gold: Any, mode: str = "strict") -> bool:
    """True if ``prediction`` equals ``gold`` under ``mode`` ("strict" or "normalized"); see the module docstring."""
    if mode not in EXACT_MATCH_MODES:
        raise ValueError(f"unknown exact-match mode {mode!r}; expected one of {EXACT_MATCH_MODES}")
    if prediction is None:
        return False
    if mode == "strict":
        return _strict_equal(prediction, gold)
    return _normalize_loose(prediction) == _normalize_loose(gold)


def donut_normalize(data: Any) -> Any:
    """Donut's ``normalize_dict``: returns ``{}`` for falsy input, else a dict/list with list-wrapped values."""
    if not data:
        return {}
    if isinstance(data, dict):
        out: dict = {}
        for key in sorted(data, key=lambda k: (len(k), k)):
            value = donut_normalize(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [normed for normed in (donut_normalize(item) for item in data) if normed]
        # type() rather than isinstance(): Donut drops booleans from scalar lists.
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def donut_flatten(data: Any) -> list[tuple[str, Any]]:
    """(dotted path, value) pairs of a normalised object; list items share their parent's path."""
    pairs: list[tuple[str, Any]] = []

    def walk(value: Any, path: str) -> None:
        if type(value) is dict:
            for key, child in value.items():
                walk(child, f"{path}.{key}" if path else key)
        elif type(value) is list:
            for item in value:
                walk(item, path)
        else:
            pairs.append((path, value))

    walk(data, "")
    return pairs


def _field_counts(prediction: Any, gold: Any) -> tuple[int, int, int]:
    pred_pairs = donut_flatten(donut_normalize({} if prediction is None else prediction))
    gold_pairs = donut_flatten(donut_normalize(gold))
    tp = fp = 0
    for pair in pred_pairs:
        if pair in gold_pairs:
            tp += 1
            gold_pairs.remove(pair)  # a gold field can be matched once only
        else:
            fp += 1
    return tp, fp, len(gold_pairs)


def _f1(tp: int, fp: int, fn: int, empty: float | None) -> float | None:
    return tp / (tp + (fp + fn) / 2) if tp + fp + fn else empty


def field_f1(prediction: Any, gold: Any) -> float | None:
    """One sample's Donut field F1, ``TP / (TP + (FP + FN) / 2)``. 0.0 for a ``None`` (invalid) prediction, whatever
    the gold; ``None`` (undefined, 0/0) for a valid prediction when neither side has a field after Donut's
    normalisation (e.g. ``{}`` vs ``{}``, or ``{"a": ""}`` vs ``{}``)."""
    if prediction is None:
        return 0.0
    return _f1(*_field_counts(prediction, gold), empty=None)


def field_prf(predictions: list, golds: list) -> dict:
    """Donut's micro-averaged field precision/recall/F1 over a dataset, with the raw tp/fp/fn counts."""
    _check_lengths(predictions, golds)
    tp = fp = fn = 0
    for prediction, gold in zip(predictions, golds, strict=True):
        t, p, n = _field_counts(prediction, gold)
        tp, fp, fn = tp + t, fp + p, fn + n
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": _f1(tp, fp, fn, empty=0.0),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _tree(data: Any, label: str = "<root>") -> zss.Node:
    node = zss.Node(label)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(_tree(value, key))
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            for item in data:
                node.addkid(_tree(item, "<subtree>"))
        else:
            for item in data:
                node.addkid(zss.Node(f"<leaf>{item}"))
    else:  # unreachable after donut_normalize, which only yields dicts and lists
        raise TypeError(f"cannot build a tree from {data!r} at {label!r}")
    return node


def _insert_remove_cost(node: zss.Node) -> int:
    label = node.label
    return len(label.replace("<leaf>", "")) if "<leaf>" in label else 1


def _update_cost(a: zss.Node, b: zss.Node) -> int:
    a_leaf, b_leaf = "<leaf>" in a.label, "<leaf>" in b.label
    if a_leaf and b_leaf:
        return Levenshtein.distance(a.label.replace("<leaf>", ""), b.label.replace("<leaf>", ""))
    if a_leaf or b_leaf:
        leaf = a.label if a_leaf else b.label
        return 1 + len(leaf.replace("<leaf>", ""))
    return int(a.label != b.label)


def _ted(a: zss.Node, b: zss.Node) -> float:
    return zss.distance(
        a,
        b,
        get_children=zss.Node.get_children,
        insert_cost=_insert_remove_cost,
        remove_cost=_insert_remove_cost,
        update_cost=_update_cost,
    )


def ted_accuracy(prediction: Any, gold: Any) -> float | None:
    """Donut's nTED accuracy, ``max(0, 1 - TED(pred, gold) / TED({}, gold))``. 0.0 for a ``None`` (invalid)
    prediction, whatever the gold; ``None`` (undefined) for a valid prediction when the gold normalises to empty
    (``{}``, ``[]``, ``""``, ``{"a": ""}``, ...), where ``TED({}, gold) = 0`` and the definition divides by zero."""
    if prediction is None:
        return 0.0
    pred_norm = donut_normalize(prediction)
    gold_norm = donut_normalize(gold)
    if not gold_norm:  # TED({}, gold) = 0: undefined, not averaged in
        return None
    gold_tree = _tree(gold_norm)
    return max(0.0, 1.0 - _ted(_tree(pred_norm), gold_tree) / _ted(_tree(donut_normalize({})), gold_tree))


def anls_star(prediction: Any, gold: Any) -> float:
    """ANLS* via the ``anls_star`` package (1.0 best). Always defined: the reference implementation scores a pair
    with nothing to compare (``{}`` vs ``{}``, ``[]`` vs ``[]``) 1.0. 0.0 for a ``None`` (invalid) prediction,
    whatever the gold (the package would score ``{}`` against a gold ``{}`` or ``{"a": null}`` 1.0)."""
    if prediction is None:
        return 0.0
    return float(anls_score(gold, prediction))


def _values_by_path(data: Any) -> dict[str, list]:
    by_path: dict[str, list] = defaultdict(list)
    for path, value in donut_flatten(donut_normalize(data)):
        by_path[path].append(value)
    return by_path


def per_field_accuracy(predictions: list, golds: list) -> dict[str, float]:
    """For each dotted path in the (Donut-normalised) golds: share of samples having it whose sorted values match."""
    _check_lengths(predictions, golds)
    seen: dict[str, int] = defaultdict(int)
    right: dict[str, int] = defaultdict(int)
    for prediction, gold in zip(predictions, golds, strict=True):
        pred_values = _values_by_path({} if prediction is None else prediction)
        for path, values in _values_by_path(gold).items():
            seen[path] += 1
            right[path] += sorted(values) == sorted(pred_values.get(path, []))
    return {path: right[path] / seen[path] for path in sorted(seen)}


FIELD_OUTCOMES = ("right", "wrong", "missed", "hallucinated", "empty")


def _skeleton_paths(skeleton: Any, path: str = "") -> set[str]:
    """Dotted leaf paths of a skeleton, named as Donut's: dict keys are walked, a list stands for its items (every
    item walked; a skeleton normally has one), an empty list or any scalar is a leaf, an empty dict has none."""
    if isinstance(skeleton, dict):
        return {
            leaf for key, child in skeleton.items() for leaf in _skeleton_paths(child, f"{path}.{key}" if path else key)
        }
    if isinstance(skeleton, list) and skeleton:
        return {leaf for item in skeleton for leaf in _skeleton_paths(item, path)}
    return {path}


def _outcome(gold_values: list, pred_values: list) -> str:
    if gold_values:
        if not pred_values:
            return "missed"
        return "right" if sorted(gold_values) == sorted(pred_values) else "wrong"
    return "hallucinated" if pred_values else "empty"


def field_outcomes(predictions: list, golds: list, skeleton: dict | None = None) -> dict[str, dict[str, int]]:
    """Per dotted path (sorted), how many samples had each outcome there: ``right``, ``wrong``, ``missed``,
    ``hallucinated`` (filled but should be empty) or ``empty``; see the module docstring. A sample's paths are the
    skeleton's leaves, the paths any gold of the set fills, and its own prediction's paths."""
    _check_lengths(predictions, golds)
    gold_by_sample = [_values_by_path(gold) for gold in golds]
    known = (_skeleton_paths(skeleton) if skeleton is not None else set()) | {p for g in gold_by_sample for p in g}
    counts: dict[str, dict[str, int]] = {}
    for prediction, gold_values in zip(predictions, gold_by_sample, strict=True):
        pred_values = _values_by_path({} if prediction is None else prediction)
        for path in known | pred_values.keys():
            outcome = _outcome(gold_values.get(path, []), pred_values.get(path, []))
            counts.setdefault(path, dict.fromkeys(FIELD_OUTCOMES, 0))[outcome] += 1
    return {path: counts[path] for path in sorted(counts)}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _accuracy(c: dict[str, int]) -> float | None:
    return _ratio(c["right"], c["right"] + c["wrong"] + c["missed"])


def _hallucination(c: dict[str, int]) -> float | None:
    return _ratio(c["hallucinated"], c["hallucinated"] + c["empty"])


def field_changes(before: dict, after: dict) -> dict[str, dict[str, float | int | None]]:
    """What changed per field between two :func:`score` metrics of the SAME samples (e.g. before and after a DPO
    stage). Per path in either ``per_field`` (a path absent on one side counts zeros there): each outcome's
    after-count minus before-count (ints; fewer ``hallucinated`` is better), ``accuracy`` = change of
    right / (right + wrong + missed) and ``hallucination`` = change of hallucinated / (hallucinated + empty), each
    ``None`` where the rate is undefined (zero denominator) on either side. Raises ``ValueError`` if either lacks
    ``per_field`` or their ``num_samples`` differ."""
    if "per_field" not in before or "per_field" not in after:
        raise ValueError("field_changes needs metrics with per_field outcome counts (finetune.metrics.score)")
    if before.get("num_samples") != after.get("num_samples"):
        raise ValueError(
            f"field_changes compares the same samples, got {before.get('num_samples')} and {after.get('num_samples')}"
        )
    zero = dict.fromkeys(FIELD_OUTCOMES, 0)
    changes: dict[str, dict[str, float | int | None]] = {}
    for path in sorted(before["per_field"].keys() | after["per_field"].keys()):
        old, new = before["per_field"].get(path, zero), after["per_field"].get(path, zero)
        change: dict[str, float | int | None] = {k: new[k] - old[k] for k in FIELD_OUTCOMES}
        for name, rate in (("accuracy", _accuracy), ("hallucination", _hallucination)):
            a, b = rate(old), rate(new)
            change[name] = None if a is None or b is None else b - a
        changes[path] = change
    return changes


def _check_lengths(predictions: list, golds: list) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score(
    golds: list,
    predictions: list,
    *,
    skeleton: dict | None = None,
    headline: str = "strict",
    schema: dict | None = None,
) -> tuple[dict, list[dict]]:
    """Aggregate metrics and per-sample scores; ``predictions`` are parsed objects or None (invalid JSON).
    Conformance is checked against ``schema``, else the skeleton's schema (`finetune.schema`).

    A per-sample ``field_f1`` / ``ted_accuracy`` of ``None`` is undefined for that pair (module docstring);
    ``ted_accuracy`` is the mean over defined pairs only, ``field_f1`` is micro-averaged (undefined pairs add
    nothing to its counts), and ``field_f1_undefined`` / ``ted_accuracy_undefined`` count the pairs left out.
    ``per_field`` holds :func:`field_outcomes` (the skeleton's fields counted even where neither side fills them),
    with ``hallucinated_field_rate`` and ``missed_field_rate`` over all its counts."""
    if headline not in EXACT_MATCH_MODES:
        raise ValueError(f"unknown headline mode {headline!r}; expected one of {EXACT_MATCH_MODES}")
    _check_lengths(predictions, golds)
    # One validator for the whole set rather than one per sample.
    if schema is None and skeleton is not None:
        schema = schema_from_skeleton(skeleton)
    validator = Draft202012Validator(schema) if schema is not None else None
    samples: list[dict] = []
    for prediction, gold in zip(predictions, golds, strict=True):
        strict = json_exact_match(prediction, gold, "strict")
        loose = json_exact_match(prediction, gold, "normalized")
        sample = {
            "exact_match": strict if headline == "strict" else loose,
            "exact_match_strict": strict,
            "exact_match_normalized": loose,
            "field_f1": field_f1(prediction, gold),
            "ted_accuracy": ted_accuracy(prediction, gold),
            "anls_star": anls_star(prediction, gold),
            "valid_json": prediction is not None,
        }
        if validator is not None:
            sample["schema_valid"] = prediction is not None and validator.is_valid(prediction)
        samples.append(sample)

    prf = field_prf(predictions, golds)

    def rate(key: str) -> float:  # the mean over the pairs where the metric is defined
        return _mean([float(sample[key]) for sample in samples if sample[key] is not None])

    def undefined(key: str) -> int:
        return sum(sample[key] is None for sample in samples)

    metrics = {
        "json_exact_match": rate("exact_match"),
        "json_exact_match_strict": rate("exact_match_strict"),
        "json_exact_match_normalized": rate("exact_match_normalized"),
        "headline": headline,
        "field_precision": prf["precision"],
        "field_recall": prf["recall"],
        "field_f1": prf["f1"],
        "field_f1_undefined": undefined("field_f1"),
        "ted_accuracy": rate("ted_accuracy"),
        "ted_accuracy_undefined": undefined("ted_accuracy"),
        "anls_star": rate("anls_star"),
        "valid_json_rate": rate("valid_json"),
        "num_samples": len(samples),
        "per_field_accuracy": per_field_accuracy(predictions, golds),
    }
    per_field = field_outcomes(predictions, golds, skeleton)
    total = {k: sum(c[k] for c in per_field.values()) for k in FIELD_OUTCOMES}
    metrics["per_field"] = per_field
    metrics["hallucinated_field_rate"] = _ratio(total["hallucinated"], total["hallucinated"] + total["empty"]) or 0.0
    metrics["missed_field_rate"] = _ratio(total["missed"], total["right"] + total["wrong"] + total["missed"]) or 0.0
    if validator is not None:
        metrics["schema_conformance_rate"] = rate("schema_valid")
    return metrics, samples
