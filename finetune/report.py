"""Self-contained HTML evaluation report: metrics, per-field accuracy bars, per-field outcome counts (right, wrong,
missed, filled but should be empty; with their change since an earlier evaluation when the metrics carry
`field_changes`) and one card per sample with thumbnails and a gold-vs-prediction JSON diff. The page embeds
everything (CSS inline, images as base64 JPEG) so it can be mailed, attached to a CI run or opened offline without a
server."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path
from typing import Any

from finetune.data.dataset import load_image

THUMB_MAX = 360  # long side, px: small enough that a few hundred samples keep the file at a few MB
_ABSENT = object()  # "no counterpart on the other side", distinct from a JSON null

# Metric-name fragments that mean "a fraction in [0, 1]", shown as a percentage.
_RATE_HINTS = ("rate", "match", "accuracy", "f1", "anls", "precision", "recall", "ted", "valid", "score")
# "<metric>_undefined": how many pairs the metric was undefined for (left out of its mean; finetune.metrics).
UNDEFINED_SUFFIX = "_undefined"

CSS = """
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; background: #f4f5f7;
       margin: 0; padding: 24px; }
main { max-width: 1160px; margin: 0 auto; }
header { background: #fff; border-radius: 8px; padding: 16px 20px; margin-bottom: 16px;
         box-shadow: 0 1px 2px rgba(0,0,0,.08); display: flex; align-items: baseline; gap: 24px; flex-wrap: wrap; }
header h1 { margin: 0; font-size: 22px; }
.stat { color: #555; } .stat b { color: #1d2330; font-size: 18px; }
section.panel { background: #fff; border-radius: 8px; padding: 16px 20px; margin-bottom: 16px;
                box-shadow: 0 1px 2px rgba(0,0,0,.08); }
h2 { font-size: 16px; margin: 0 0 10px; }
.panels { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.4fr); gap: 16px; }
table.metrics { border-collapse: collapse; width: 100%; }
table.metrics td { padding: 4px 8px; border-bottom: 1px solid #eceef2; }
table.metrics th { text-align: left; padding: 4px 8px; border-bottom: 1px solid #dde0e6; color: #555; font-size: 12px; }
table.metrics td.v { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
.undefined { color: #777; font-weight: normal; font-size: 12px; }
.bar-row { display: grid; grid-template-columns: 220px 1fr 56px; gap: 8px; align-items: center; margin: 3px 0; }
.bar-name { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; overflow: hidden;
            text-overflow: ellipsis; white-space: nowrap; }
.bar-track { background: #eceef2; border-radius: 3px; height: 14px; overflow: hidden; }
.bar-fill { height: 100%; background: #3f8f5b; }
.bar-fill.low { background: #c9483e; } .bar-fill.mid { background: #d8a331; }
.bar-val { text-align: right; font-variant-numeric: tabular-nums; font-size: 12px; }
.sample-card { background: #fff; border-radius: 8px; padding: 14px 18px; margin-bottom: 14px;
               box-shadow: 0 1px 2px rgba(0,0,0,.08); border-left: 5px solid #3f8f5b; }
.sample-card.fail { border-left-color: #c9483e; } .sample-card.invalid { border-left-color: #7a3fb0; }
.card-head { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 10px; }
.origin { font-family: ui-monospace, Menlo, Consolas, monospace; color: #555; font-size: 12px; }
.badge { padding: 2px 9px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.match { background: #3f8f5b; } .badge.mismatch { background: #c9483e; } .badge.invalid { background: #7a3fb0; }
.badge.truncated { background: #b5651d; }
.scores { color: #555; font-size: 12px; } .scores b { color: #1d2330; }
.card-body { display: grid; grid-template-columns: auto minmax(0, 1fr) minmax(0, 1fr); gap: 12px; }
.thumbs img { display: block; max-width: 200px; height: auto; border: 1px solid #dde0e6; margin-bottom: 6px; }
.thumb-error { color: #c9483e; font-size: 12px; max-width: 200px; }
.json h3 { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #777; margin: 0 0 4px; }
pre { margin: 0; padding: 8px 10px; background: #f8f9fb; border: 1px solid #e4e6eb; border-radius: 4px;
      font: 12px/1.45 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-word; }
.diff-changed { background: #fff0b3; } .diff-missing { background: #fbd5d2; text-decoration: line-through; }
.diff-extra { background: #d3ecff; } .diff-invalid { background: #f3e8fb; border-color: #c8a6e6; color: #4b1f73; }
.legend span { padding: 0 6px; margin-right: 8px; border-radius: 3px; font-size: 12px; }
table.fields td.name { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
table.fields th.v { text-align: right; } table.fields td.bad { color: #c9483e; }
table.fields th.since, table.fields td.since { border-left: 1px solid #dde0e6; }
.delta.better { color: #3f8f5b; } .delta.worse { color: #c9483e; } .delta.same { color: #999; font-weight: normal; }
"""


def _is_rate(key: str, value: float) -> bool:
    # Counts and losses stay raw; a float in [0, 1] whose name looks like a rate is a percentage.
    return isinstance(value, float) and 0.0 <= value <= 1.0 and any(h in key.lower() for h in _RATE_HINTS)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if _is_rate(key, value):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def thumbnail_data_uri(ref: Any, max_side: int = THUMB_MAX) -> str:
    """Open an image reference and return it as a `data:image/jpeg;base64,...` URI, long side <= `max_side`."""
    image = load_image(ref, max_pixels=None)  # an evaluated sample's image, checked when the sample was prepared
    image.thumbnail((max_side, max_side))  # keeps aspect ratio, never upscales
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _same(a: Any, b: Any) -> bool:
    # Canonical JSON comparison: unlike ==, it tells 1 from true and 1 from "1", as a JSON reader would.
    return json.dumps(a, sort_keys=True, ensure_ascii=False) == json.dumps(b, sort_keys=True, ensure_ascii=False)


def _scalar(value: Any) -> str:
    return escape(json.dumps(value, ensure_ascii=False))


def _render(value: Any, other: Any, side: str, depth: int) -> str:
    """Pretty-print `value` as escaped HTML, marking where it differs from `other` (the same path on the other side).
    `side` is "gold" or "pred": a member only in gold is `diff-missing`, one only in the prediction `diff-extra`."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        both = isinstance(other, dict)
        lines = []
        for i, (key, sub) in enumerate(value.items()):
            sub_other = other.get(key, _ABSENT) if both else _ABSENT
            body = f"{_scalar(str(key))}: {_render(sub, sub_other, side, depth + 1)}"
            lines.append(inner + _mark(body, sub, sub_other, side, both) + ("," if i < len(value) - 1 else ""))
        return "{\n" + "\n".join(lines) + "\n" + pad + "}"
    if isinstance(value, list) and value:
        both = isinstance(other, list)
        lines = []
        for i, sub in enumerate(value):  # list items are compared by position
            sub_other = other[i] if both and i < len(other) else _ABSENT
            body = _render(sub, sub_other, side, depth + 1)
            lines.append(inner + _mark(body, sub, sub_other, side, both) + ("," if i < len(value) - 1 else ""))
        return "[\n" + "\n".join(lines) + "\n" + pad + "]"
    return _scalar(value)


def _same_kind(a: Any, b: Any) -> bool:
    return (isinstance(a, dict) and isinstance(b, dict)) or (isinstance(a, list) and isinstance(b, list))


def _mark(body: str, value: Any, other: Any, side: str, parents_match: bool) -> str:
    """Wrap one rendered member (key and value, or list item) in its diff class, if it has one."""
    if not parents_match:  # the parents already differ in kind; the mark sits on the parent
        return body
    if other is _ABSENT:
        return f'<span class="{"diff-missing" if side == "gold" else "diff-extra"}">{body}</span>'
    if not _same_kind(value, other) and not _same(value, other):  # same-kind containers mark their own leaves
        return f'<span class="diff-changed">{body}</span>'
    return body


def json_diff_html(gold: Any, prediction: Any) -> tuple[str, str]:
    """Return (gold_html, prediction_html): both pretty-printed, escaped, with diff-* spans on differing members."""
    gold_html, pred_html = _render(gold, prediction, "gold", 0), _render(prediction, gold, "pred", 0)
    # A top-level kind change (e.g. a dict predicted as a list) has no members to compare: the whole value differs.
    if not _same_kind(gold, prediction) and not _same(gold, prediction):
        gold_html = f'<span class="diff-changed">{gold_html}</span>'
        pred_html = f'<span class="diff-changed">{pred_html}</span>'
    return gold_html, pred_html


def _sort_key(record: dict) -> tuple:
    # Failures first; among them invalid JSON, then lower field F1 / TED accuracy; missing scores sort as worst.
    f1, ted = record.get("field_f1"), record.get("ted_accuracy")
    return (
        bool(record.get("exact_match")),
        bool(record.get("valid_json")),
        -1.0 if f1 is None else f1,
        -1.0 if ted is None else ted,
        record.get("index", 0),
    )


def _card(record: dict) -> str:
    index = record.get("index", 0)
    if record.get("truncated"):  # cut by max_new_tokens: scored as invalid
        status, badge, label = "invalid", "truncated", "truncated (max_new_tokens)"
    elif not record.get("valid_json"):
        status, badge, label = "invalid", "invalid", "invalid JSON"
    elif record.get("exact_match"):
        status, badge, label = "ok", "match", "match"
    else:
        status, badge, label = "fail", "mismatch", "mismatch"
    scores = []
    for key, name in (("field_f1", "field F1"), ("ted_accuracy", "TED acc"), ("anls_star", "ANLS*")):
        if record.get(key) is not None:
            scores.append(f"{escape(name)} <b>{100 * float(record[key]):.1f}%</b>")
        elif key in record:  # scored, but the metric is undefined for this pair (e.g. nTED with an empty gold)
            scores.append(f'{escape(name)} <b title="undefined for this pair, not in the mean">n/a</b>')
    if record.get("schema_valid") is not None:
        scores.append(f"schema <b>{'valid' if record['schema_valid'] else 'invalid'}</b>")

    thumbs = []
    for ref in record.get("images") or []:
        # A missing or corrupt image should not cost the whole report: show the error in its place.
        try:
            thumbs.append(f'<img alt="sample {index}" src="{thumbnail_data_uri(ref)}">')
        except (OSError, ValueError, KeyError, TypeError) as exc:
            thumbs.append(f'<div class="thumb-error">image unavailable: {escape(str(exc))}</div>')

    if record.get("valid_json"):
        gold_html, pred_html = json_diff_html(record.get("target"), record.get("prediction"))
        pred_block = f"<pre>{pred_html}</pre>"
    else:
        gold_html = _render(record.get("target"), _ABSENT, "gold", 0)
        pred_block = f'<pre class="diff-invalid">{escape(str(record.get("text", "")))}</pre>'
    return (
        f'<article class="sample-card {status}" data-index="{escape(str(index))}">'
        f'<div class="card-head"><b>#{escape(str(index))}</b>'
        f'<span class="origin">{escape(str(record.get("origin", "")))}</span>'
        f'<span class="badge {badge}">{label}</span><span class="scores">{" · ".join(scores)}</span></div>'
        f'<div class="card-body"><div class="thumbs">{"".join(thumbs)}</div>'
        f'<div class="json"><h3>gold</h3><pre>{gold_html}</pre></div>'
        f'<div class="json"><h3>prediction</h3>{pred_block}</div></div></article>'
    )


def _headline(metrics: dict, records: list[dict]) -> tuple[str, float | None]:
    """The exact-match figure for the header: the metric `headline` names if present, else json_exact_match, else
    the fraction of records marked exact_match."""
    name = metrics.get("headline")
    if isinstance(name, str) and isinstance(metrics.get(name), (int, float)):
        return name, float(metrics[name])
    if isinstance(metrics.get("json_exact_match"), (int, float)):
        return name or "json_exact_match", float(metrics["json_exact_match"])
    if records:
        return name or "exact_match", sum(bool(r.get("exact_match")) for r in records) / len(records)
    return name or "exact_match", None


def _scalar_metric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_table(metrics: dict) -> str:
    """One row per scalar metric; a metric with a `<name>_undefined` count shows it in its own row: the value is the
    mean over the defined pairs only, "n/a" when no pair was defined."""
    total = metrics.get("num_samples")
    rows = []
    for k, v in metrics.items():
        if not _scalar_metric(v):
            continue
        key = str(k)
        if key.endswith(UNDEFINED_SUFFIX) and _scalar_metric(metrics.get(key[: -len(UNDEFINED_SUFFIX)])):
            continue  # shown with its metric
        value, note = escape(_fmt(key, v)), ""
        count = metrics.get(key + UNDEFINED_SUFFIX)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            of = f" of {total:,}" if isinstance(total, int) else ""
            if isinstance(total, int) and count >= total:
                value = "n/a"
                note = f"undefined for all {total:,} samples"
            else:
                note = f"{count:,}{of} undefined, not in the mean"
            note = f' <span class="undefined">({escape(note)})</span>'
        rows.append(f'<tr><td>{escape(key)}</td><td class="v">{value}{note}</td></tr>')
    return f'<table class="metrics">{"".join(rows)}</table>' if rows else "<p>No scalar metrics.</p>"


def _field_bars(per_field: dict) -> str:
    if not per_field:
        return "<p>No per-field accuracy.</p>"
    rows = []
    for field, acc in sorted(per_field.items(), key=lambda kv: (kv[1], kv[0])):  # worst fields first
        acc = min(max(float(acc), 0.0), 1.0)
        level = "low" if acc < 0.5 else "mid" if acc < 0.8 else ""
        rows.append(
            f'<div class="bar-row"><span class="bar-name" title="{escape(str(field))}">{escape(str(field))}'
            f'</span><div class="bar-track"><div class="bar-fill {level}" style="width:{100 * acc:.1f}%">'
            f'</div></div><span class="bar-val">{100 * acc:.1f}%</span></div>'
        )
    return "".join(rows)


# finetune.metrics.field_outcomes: (key, column heading); the last three are errors, worst rows have most of them.
_OUTCOME_COLUMNS = (
    ("right", "right"),
    ("empty", "left empty"),
    ("wrong", "wrong"),
    ("missed", "missed"),
    ("hallucinated", "filled but should be empty"),
)
_ERRORS = ("wrong", "missed", "hallucinated")


def _delta(change: Any) -> str:
    """A signed count change, e.g. "+3" or "−2" (a rise in errors is worse); "0" for none, "" when unknown."""
    if not _scalar_metric(change):
        return ""
    if change == 0:
        return '<span class="delta same">0</span>'
    sign, level = ("+", "worse") if change > 0 else ("−", "better")
    return f'<span class="delta {level}">{sign}{abs(change):,}</span>'


def _field_outcomes(per_field: dict, changes: dict | None) -> str:
    """One row per field (most wrong + missed + hallucinated first) with its outcome counts; with `changes`
    ({"since": tag, "fields": finetune.metrics.field_changes(...)}) also the error counts' change since `tag`."""
    if not isinstance(changes, dict):
        changes = None
    fields = (changes or {}).get("fields") or {}
    if not per_field and not fields:
        return ""
    rows = []
    names = sorted(per_field.keys() | fields.keys())  # a field only in the change: one only the earlier run filled
    for name in sorted(names, key=lambda n: -sum((per_field.get(n) or {}).get(k) or 0 for k in _ERRORS)):
        counts = per_field.get(name) or {}
        cells = "".join(
            f'<td class="v{" bad" if k in _ERRORS and (counts.get(k) or 0) else ""}">{counts.get(k) or 0:,}</td>'
            for k, _ in _OUTCOME_COLUMNS
        )
        if changes is not None:
            change = fields.get(name) or {}
            cells += "".join(f'<td class="v since">{_delta(change.get(k))}</td>' for k in _ERRORS)
        rows.append(f'<tr><td class="name">{escape(str(name))}</td>{cells}</tr>')
    head = "".join(f'<th class="v">{escape(label)}</th>' for _, label in _OUTCOME_COLUMNS)
    note = ""
    if changes is not None:
        since = escape(str(changes.get("since", "")))
        head += "".join(f'<th class="v since">{escape(k)}</th>' for k in _ERRORS)
        head = (
            f'<tr><th colspan="{1 + len(_OUTCOME_COLUMNS)}"></th>'
            f'<th class="since" colspan="{len(_ERRORS)}">change since {since}</th></tr><tr><th>field</th>{head}</tr>'
        )
        note = f"<p>Change since {since}: after minus before on the same samples; a fall (−) in errors is better.</p>"
    else:
        head = f"<tr><th>field</th>{head}</tr>"
    return (
        '<section class="panel"><h2>Fields: right / wrong / missed / filled but should be empty</h2>'
        f'<table class="metrics fields">{head}{"".join(rows)}</table>{note}</section>'
    )


def _target_stats(target_stats: dict[str, dict[str, dict[str, int]]] | None) -> str:
    """Per split, the fields some targets miss, leave empty or null (target_stats.py): a missing gold field is not
    scored, and a field often missing in training is one the model learns to leave out."""
    if not target_stats:
        return ""
    rows = []
    for split, fields in target_stats.items():
        for name, c in fields.items():
            if c["missing"] or c["empty"] or c["null"]:
                cells = "".join(f'<td class="v">{c[k]:,}</td>' for k in ("missing", "empty", "null", "of"))
                rows.append(f"<tr><td>{escape(split)}</td><td>{escape(name)}</td>{cells}</tr>")
    if not rows:
        splits = " and ".join(escape(s) for s in target_stats)
        body = f"<p>Every field of the skeleton is present and non-empty in every target ({splits}).</p>"
    else:
        head = "<tr><th>targets</th><th>field</th><th>missing</th><th>empty</th><th>null</th><th>of</th></tr>"
        body = f'<table class="metrics target-stats">{head}{"".join(rows)}</table>'
    return f'<section class="panel"><h2>Targets: fields missing, empty or null</h2>{body}</section>'


def render_report(
    records: list[dict],
    metrics: dict,
    *,
    title: str = "Evaluation report",
    target_stats: dict[str, dict[str, dict[str, int]]] | None = None,
) -> str:
    """Build the report page as one HTML string (see `write_report`)."""
    headline_name, headline_value = _headline(metrics, records)
    headline_text = "n/a" if headline_value is None else f"{100 * headline_value:.1f}%"
    cards = "\n".join(_card(r) for r in sorted(records, key=_sort_key))
    legend = (
        '<p class="legend"><span class="diff-changed">changed</span><span class="diff-missing">missing</span>'
        '<span class="diff-extra">extra</span><span class="diff-invalid">invalid JSON</span></p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body><main>
<header><h1>{escape(title)}</h1><span class="stat">samples <b>{len(records)}</b></span>
<span class="stat">exact match ({escape(str(headline_name))}) <b>{headline_text}</b></span></header>
<div class="panels"><section class="panel"><h2>Metrics</h2>{_metric_table(metrics)}</section>
<section class="panel"><h2>Per-field accuracy (worst first)</h2>{_field_bars(metrics.get("per_field_accuracy") or {})}
</section></div>
{_field_outcomes(metrics.get("per_field") or {}, metrics.get("field_changes"))}
{_target_stats(target_stats)}
<section><h2>Samples (failures first)</h2>{legend}
{cards}
</section></main></body></html>
"""


def write_report(
    path: str | Path,
    records: list[dict],
    metrics: dict,
    *,
    title: str = "Evaluation report",
    target_stats: dict[str, dict[str, dict[str, int]]] | None = None,
) -> Path:
    """Write one self-contained HTML report (no external CSS/JS/fonts/images) to `path` and return the path.
    `target_stats`: per split label, `target_field_stats` of its targets (shown where some field is missing,
    empty or null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(records, metrics, title=title, target_stats=target_stats), encoding="utf-8")
    return path
