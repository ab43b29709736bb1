"""HTML evaluation report: self-contained, escaped, failures first, diff classes; renders in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

from finetune.report import write_report

BROWSER_TIMEOUT_S = 60


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (800, 600)) -> str:
    """A small synthetic 'document': coloured page with a few dark text-like bars (larger than a thumbnail)."""
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    for i in range(6):
        draw.rectangle([40, 40 + 70 * i, 40 + 90 * (i + 2), 70 + 70 * i], fill=(30, 30, 40))
    image.save(path)
    return str(path)


def _records(tmp_path: Path) -> list[dict]:
    img = [
        _image(tmp_path / f"doc{i}.png", c)
        for i, c in enumerate([(250, 250, 240), (220, 235, 250), (250, 225, 225), (230, 250, 230), (245, 235, 210)])
    ]
    gold = {"number": "INV-1", "total": "10.00", "items": [{"name": "pen", "qty": 2}]}
    return [
        # 0: exact match
        {
            "index": 0,
            "origin": "data/val.jsonl:1",
            "images": [img[0]],
            "target": gold,
            "prediction": gold,
            "text": '{"number": "INV-1"}',
            "valid_json": True,
            "exact_match": True,
            "field_f1": 1.0,
            "ted_accuracy": 1.0,
            "anls_star": 1.0,
            "schema_valid": True,
        },
        # 1: mismatch with a changed value, a missing key and an extra key
        {
            "index": 1,
            "origin": "data/val.jsonl:2",
            "images": [img[1]],
            "target": gold,
            "prediction": {"number": "INV-7", "items": [{"name": "pen", "qty": 2}], "bogus": "x"},
            "text": "...",
            "valid_json": True,
            "exact_match": False,
            "field_f1": 0.4,
            "ted_accuracy": 0.5,
        },
        # 2: mismatch inside a list item (compared by position) plus an extra list item; image as {"bytes": ...}
        {
            "index": 2,
            "origin": "data/val.jsonl:3",
            "images": [{"bytes": Path(img[2]).read_bytes(), "path": None}],
            "target": gold,
            "prediction": {
                "number": "INV-1",
                "total": "10.00",
                "items": [{"name": "pen", "qty": 3}, {"name": "cap", "qty": 1}],
            },
            "text": "...",
            "valid_json": True,
            "exact_match": False,
            "field_f1": 0.8,
            "ted_accuracy": 0.9,
        },
        # 3: invalid JSON; the raw text itself needs escaping
        {
            "index": 3,
            "origin": "data/val.jsonl:4",
            "images": [img[3]],
            "target": gold,
            "prediction": None,
            "text": '{"number": "INV-1", <broken & cut',
            "valid_json": False,
            "exact_match": False,
            "field_f1": 0.0,
        },
        # 4: exact match with unicode and a script tag in a value
        {
            "index": 4,
            "origin": "data/val.jsonl:5",
            "images": [img[4], img[0]],
            "target": {"name": "Zoë Müller — 東京 €", "note": "<script>alert(1)</script>"},
            "prediction": {"name": "Zoë Müller — 東京 €", "note": "<script>alert(1)</script>"},
            "text": "...",
            "valid_json": True,
            "exact_match": True,
            "field_f1": 1.0,
        },
    ]


METRICS = {
    "json_exact_match": 0.4,
    "valid_json_rate": 0.8,
    "field_f1": 0.64,
    "num_samples": 5,
    "headline": "json_exact_match",
    "per_field_accuracy": {"number": 0.8, "total": 0.6, "items.name": 1.0, "items.qty": 0.25},
}


def _cards(html: str) -> list[tuple[int, str]]:
    """(data-index, card html) for each sample card, in page order."""
    parts = re.split(r'(?=<article class="sample-card)', html)[1:]
    return [(int(re.search(r'data-index="(\d+)"', p).group(1)), p) for p in parts]


@pytest.fixture
def report(tmp_path) -> tuple[Path, list[dict]]:
    records = _records(tmp_path)
    return write_report(tmp_path / "out" / "report.html", records, METRICS, title="Val <report>"), records


def test_report_content(report):
    path, records = report
    html = path.read_text(encoding="utf-8")

    # self-contained: no external references of any kind
    assert "http://" not in html and "https://" not in html and 'src="/' not in html
    assert "<link" not in html and "<script" not in html.replace("&lt;script", "")
    assert '<meta charset="utf-8">' in html

    # escaping: the script value and the title come out as text; unicode kept as is
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Val &lt;report&gt;" in html
    assert "Zoë Müller — 東京 €" in html

    cards = _cards(html)
    assert sorted(i for i, _ in cards) == [r["index"] for r in records]
    order = [i for i, _ in cards]
    # failures first (invalid JSON, then by field F1), then the exact matches
    assert order[:3] == [3, 1, 2] and set(order[3:]) == {0, 4}
    card = dict(cards)

    # diffs: changed value, missing key, extra key; list items by position
    assert re.search(r'class="diff-changed">&quot;number&quot;: &quot;INV-1&quot;', card[1])
    assert re.search(r'class="diff-changed">&quot;number&quot;: &quot;INV-7&quot;', card[1])
    assert re.search(r'class="diff-missing">&quot;total&quot;', card[1])
    assert re.search(r'class="diff-extra">&quot;bogus&quot;', card[1])
    assert re.search(r'class="diff-changed">&quot;qty&quot;: 3', card[2])
    assert 'class="diff-extra">{' in card[2]  # the second predicted item has no gold counterpart
    assert "diff-changed" not in card[2].split("&quot;items&quot;")[0]  # number/total equal: not marked
    assert 'class="diff-invalid">{&quot;number&quot;: &quot;INV-1&quot;, &lt;broken &amp; cut' in card[3]
    for i in (0, 4):
        assert not re.search(r"class=\"diff-", card[i])
    assert "mismatch" in card[1] and "invalid JSON" in card[3] and "badge match" in card[0]

    # thumbnails: embedded JPEGs, long side <= 360 px
    assert html.count('src="data:image/jpeg;base64,') == 6
    assert 'class="thumb-error"' not in html

    # metrics: rates as percentages, per-field bars worst first, headline shown
    assert "40.0%" in html and "80.0%" in html and "json_exact_match" in html
    bars = re.findall(r'class="bar-name" title="([^"]+)"', html)
    assert bars == ["items.qty", "total", "number", "items.name"]


def test_thumbnail_size(tmp_path):
    import base64
    import io

    from finetune.report import thumbnail_data_uri

    uri = thumbnail_data_uri(_image(tmp_path / "big.png", (255, 255, 255), size=(1000, 1400)))
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == 360 and thumb.size[0] < 360


def _browser() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test, but no chromium / chromium-browser is on PATH")
        pytest.skip("no chromium / chromium-browser on PATH")
    return exe


def _run_browser(exe: str, args: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium; fall back to --headless=new where plain --headless is refused."""
    env = {**os.environ, "HOME": str(home)}  # Chromium writes its profile/crash dirs under HOME
    base = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={home / 'profile'}",
        "--window-size=1200,1600",
    ]
    for headless in ("--headless", "--headless=new"):
        result = subprocess.run(
            [exe, headless, *base, *args],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=BROWSER_TIMEOUT_S,
        )
        if result.returncode == 0:
            return result
    pytest.fail(f"chromium failed (rc {result.returncode}): {result.stderr[-2000:]}")


@pytest.mark.slow
def test_report_renders_in_chromium(report, tmp_path):
    exe = _browser()
    path, records = report
    home = tmp_path / "home"
    home.mkdir()
    url = path.resolve().as_uri()

    shot = tmp_path / "shot.png"
    _run_browser(exe, [f"--screenshot={shot}", url], home)
    assert shot.exists() and shot.stat().st_size > 0
    with Image.open(shot) as image:
        image = image.convert("RGB")
        assert image.size[0] >= 1000
        colours = image.getcolors(maxcolors=1 << 20)
        stddev = sum(ImageStat.Stat(image).stddev) / 3
        assert (colours is None or len(colours) > 50) or stddev > 10, "screenshot looks blank"
        assert image.getextrema() != ((255, 255), (255, 255), (255, 255)), "screenshot is all white"

    dom = _run_browser(exe, ["--dump-dom", url], home).stdout
    assert len(re.findall(r'class="sample-card[ "]', dom)) == len(records)
    assert len(set(re.findall(r'data-index="(\d+)"', dom))) == len(records)


def test_report_shows_undefined_counts():
    from finetune.metrics import score
    from finetune.report import render_report

    golds, predictions = [{"a": "x"}, {}, {}], [{"a": "x"}, {}, None]
    metrics, samples = score(golds, predictions)
    records = [
        {"index": i, "target": g, "prediction": p, "valid_json": p is not None, **s}
        for i, (g, p, s) in enumerate(zip(golds, predictions, samples, strict=True))
    ]
    html = render_report(records, metrics)
    # nTED: sample 2 has an empty gold (undefined); the mean is over samples 1 and 3 (1 and 0) -> 50%.
    assert 'ted_accuracy</td><td class="v">50.0% <span class="undefined">(1 of 3 undefined, not in the mean)' in html
    assert ">ted_accuracy_undefined<" not in html  # folded into its metric's row
    card = {i: c for i, c in _cards(html)}[1]
    assert 'TED acc <b title="undefined for this pair, not in the mean">n/a</b>' in card
    all_undefined = render_report([], {"ted_accuracy": 0.0, "ted_accuracy_undefined": 2, "num_samples": 2})
    assert 'n/a <span class="undefined">(undefined for all 2 samples)' in all_undefined


def test_report_shows_the_fields_targets_miss_or_leave_empty_per_split():
    from finetune.data.dataset import Sample
    from finetune.evaluation import score
    from finetune.report import render_report

    skeleton = {"number": "", "total": "", "items": [{"qty": 0}]}
    golds = [{"number": "1", "total": "", "items": [{"qty": 2}]}, {"number": "2", "items": [{}]}]
    samples = [Sample([], g, f"test.jsonl:{i + 1}", [], 1) for i, g in enumerate(golds)]
    result = score(samples, [{"index": 0, "text": "{}"}, {"index": 1, "text": "{}"}], skeleton=skeleton)
    assert result.target_fields["total"] == {"of": 2, "present": 0, "missing": 1, "empty": 1, "null": 0}
    assert result.target_fields["items[].qty"]["missing"] == 1 and result.target_fields["number"]["present"] == 2
    train = {"number": {"of": 9, "present": 9, "missing": 0, "empty": 0, "null": 0}}
    html = render_report([], result.metrics, target_stats={"evaluated": result.target_fields, "train": train})
    rows = re.findall(r"<tr><td>(\w+)</td><td>([\w.\[\]]+)</td>((?:<td class=\"v\">[\d,]+</td>){4})</tr>", html)
    assert [(split, name) for split, name, _ in rows] == [("evaluated", "total"), ("evaluated", "items[].qty")]
    assert re.findall(r">([\d,]+)<", rows[0][2]) == ["1", "1", "0", "2"]  # missing, empty, null, of
    complete = render_report([], result.metrics, target_stats={"train": train})
    assert "present and non-empty in every target (train)" in complete
    assert "Targets: fields missing" not in render_report([], result.metrics)


def _field_rows(html: str) -> dict[str, list[str]]:
    """Field name -> the texts of its cells, from the per-field outcome table, in page order (dicts keep it)."""
    table = re.search(r'<table class="metrics fields">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r'<tr><td class="name">([^<]+)</td>(.*?)</tr>', table)
    return {
        name: [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", cells)]
        for name, cells in rows
    }


def test_report_shows_per_field_outcomes_and_their_change():
    from finetune.metrics import field_changes, score
    from finetune.report import render_report

    skeleton = {"name": "", "note": "", "total": ""}
    golds = [{"name": "A", "total": "5"}, {"name": "B", "total": "6"}, {"name": "C", "note": ""}]
    before, _ = score(
        golds, [{"name": "A", "note": "x"}, {"name": "B", "note": "y"}, {"name": "C", "note": "z"}], skeleton=skeleton
    )
    after, _ = score(
        golds, [{"name": "A", "total": "5"}, {"name": "X", "total": "6"}, {"name": "C", "<b>": "1"}], skeleton=skeleton
    )
    # before: name right 3; note hallucinated 3; total missed 2, empty 1.
    # after: name right 2, wrong 1; note empty 3; total right 2, empty 1; "<b>" invented once.
    html = render_report([], before)
    assert "Fields: right / wrong / missed / filled but should be empty" in html and "change since" not in html
    columns = ["right", "left empty", "wrong", "missed", "filled but should be empty"]
    assert re.findall(r'<th class="v">([^<]+)</th>', html) == columns
    rows = _field_rows(html)
    assert list(rows) == ["note", "total", "name"]  # worst first: 3 errors, 2, 0
    assert rows == {
        "note": ["0", "0", "0", "0", "3"],
        "total": ["0", "1", "0", "2", "0"],
        "name": ["3", "0", "0", "0", "0"],
    }
    # The new rates are scalars in the metrics table; the per-field dicts are not rows there.
    assert 'hallucinated_field_rate</td><td class="v">75.0%' in html  # 3 of the 4 should-be-empty fields
    assert 'missed_field_rate</td><td class="v">40.0%' in html  # 2 of the 5 gold-filled fields
    assert "<td>per_field</td>" not in html and "<td>field_changes</td>" not in html

    after["field_changes"] = {"since": "sft <1>", "fields": field_changes(before, after)}
    html = render_report([], after)
    assert "change since sft &lt;1&gt;" in html and "sft <1>" not in html
    assert re.findall(r'<th class="v since">([^<]+)</th>', html) == ["wrong", "missed", "hallucinated"]
    rows = _field_rows(html)
    assert list(rows) == ["&lt;b&gt;", "name", "note", "total"]  # errors 1, 1, 0, 0; ties by name
    # counts (right, left empty, wrong, missed, filled), then the change of wrong, missed, hallucinated
    assert rows["&lt;b&gt;"] == ["0", "0", "0", "0", "1", "0", "0", "+1"]
    assert rows["name"] == ["2", "0", "1", "0", "0", "+1", "0", "0"]
    assert rows["note"] == ["0", "3", "0", "0", "0", "0", "0", "−3"]
    assert rows["total"] == ["2", "1", "0", "0", "0", "0", "−2", "0"]
    assert '<span class="delta better">−3</span>' in html and '<span class="delta worse">+1</span>' in html
