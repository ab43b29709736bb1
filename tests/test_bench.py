"""Smoke tests for the benchmark scripts: each runs end to end with tiny settings and prints its table.
They check that the scripts work and report sane quantities, never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_train_compares_the_trainers(tmp_path):
    stdout = run_script(
        "bench_train.py",
        "--model",
        "tiny",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--rounds",
        "1",
        "--batch-size",
        "2",
        "--samples",
        "12",
        "--out",
        str(tmp_path),
    )
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["trainer"]: row for row in results["rows"]}
    assert set(rows) == {"ours", "bare", "trl"}
    # The FLOP fit holds, with a quadratic (attention) term: the score matmuls are counted.
    assert results["flops"]["fitted"] and results["flops"]["coefficients"][2] > 0
    for row in rows.values():
        assert row["steps"] == 2 and 0 < row["mfu"] < 1
    # Ours, the bare loop and TRL train on the same samples from the same weights.
    assert rows["ours"]["first_loss"] == pytest.approx(rows["bare"]["first_loss"], rel=1e-4)
    assert rows["ours"]["padding"] == pytest.approx(rows["bare"]["padding"])
    assert rows["trl"]["first_loss"] == pytest.approx(rows["ours"]["first_loss"], rel=0.02)
    assert "| ours |" in stdout and "| trl |" in stdout


def test_bench_preprocess_times_every_page(tmp_path):
    stdout = run_script("bench_preprocess.py", "--repeats", "1", "--scale", "0.1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 5 and all(r["tiles"] >= 1 and r["whole"] > 0 and r["llava_onevision"] > 0 for r in rows)
    assert "A4 scan, 300 dpi" in stdout and "35 MP" in stdout


def test_bench_preprocess_times_real_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (1200, 1700), "white").save(tmp_path / "scan.jpg")
    Image.new("L", (900, 400), 128).save(tmp_path / "table.png")
    out = tmp_path / "out"
    stdout = run_script("bench_preprocess.py", "--repeats", "1", "--images", str(tmp_path), "--out", str(out))
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["page"] for r in rows] == ["scan.jpg", "table.png"] and all(r["images_per_s"] > 0 for r in rows)
    assert "1200×1700 JPEG" in stdout


def test_bench_memory_measures_each_step_in_a_fresh_process(tmp_path):
    args = ("--steps", "check", "train", "--repeats", "1", "--scale", "0.05", "--out", str(tmp_path))
    stdout = run_script("bench_memory.py", *args)
    peaks = json.loads((tmp_path / "results-after.json").read_text())["peak_rss_mib"]
    assert len(peaks) == 4 and all(0 < p[step] < 8192 for p in peaks.values() for step in ("check", "train"))
    assert "| 35 MP scan, JPEG |" in stdout


def test_bench_learn_records_a_learning_curve(tmp_path):
    stdout = run_script(
        "bench_learn.py",
        "--preset",
        "digits",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-samples",
        "4",
        "--train-samples",
        "16",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
    )
    curve = json.loads((tmp_path / "results.json").read_text())["curve"]
    assert [point["step"] for point in curve] == [2, 4]
    assert all(0 <= point["field_f1"] <= 1 and point["minutes"] > 0 for point in curve)
    assert "field F1" in stdout


def test_bench_learn_dpo_compares_more_sft_with_a_dpo_stage(tmp_path):
    """At toy size (an untrained model: every answer is wrong, so every form gives a pair): phase 0, one DPO run and
    one SFT run from its model, all starting from the same weights, and the table of the three."""
    stdout = run_script(
        "bench_learn.py",
        "--dpo",
        *("--train-samples", "16", "--eval-samples", "4", "--batch-size", "4", "--threads", "1"),
        *("--base-steps", "2", "--base-eval-every", "2", "--dpo-steps", "1", "--pair-samples", "4"),
        *("--dpo-lr", "1e-3", "--sft-steps", "1", "--out", str(tmp_path)),
    )
    results = json.loads((tmp_path / "results-dpo.json").read_text())
    assert results["same_start"] is True
    [dpo] = results["dpo"]
    assert dpo["pair_summary"]["pairs"] == 4 and dpo["steps"] == 1 and dpo["rows"] == 8  # a pair is two rows
    assert results["sft"]["steps"] == 1 and results["sft"]["rows"] == 4
    assert 0 <= dpo["after"]["hallucinated_field_rate"] <= 1
    assert "(b) + DPO, pairs: self" in stdout and "(a) + more SFT" in stdout
