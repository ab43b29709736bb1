"""Tests for the synthetic invoice / receipt / form generator (finetune.synthetic)."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from finetune.synthetic.invoices import make_document, write_dataset

REPO = Path(__file__).resolve().parents[1]
MONEY = re.compile(r"^\d+\.\d{2}$")
INVOICE_KEYS = {"invoice_number", "date", "seller", "buyer", "items", "subtotal", "tax", "total", "currency"}
RECEIPT_KEYS = {"store", "date", "items", "total"}
PRESET_KEYS = {
    "simple": [{"number", "total"}],
    "digits": [{"number"}],
    "form": [{"name", "date", "total"}],
    "invoices": [INVOICE_KEYS, RECEIPT_KEYS],
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def targets(preset: str, n: int, tag: str = "t") -> list[dict]:
    return [make_document(random.Random(f"{tag}/{i}"), preset)[1] for i in range(n)]


@pytest.fixture(scope="module")
def invoice_targets() -> list[dict]:
    # 30 documents is enough to hit every layout, invoices and receipts alike.
    return targets("invoices", 30)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("invoices")
    write_dataset(out, seed=0, n_train=3, n_val=2, n_test=2)
    return out


def test_same_seed_gives_byte_identical_files(small_dataset, tmp_path):
    write_dataset(tmp_path, seed=0, n_train=3, n_val=2, n_test=2)
    first, second = tree_bytes(small_dataset), tree_bytes(tmp_path)
    assert sorted(first) == sorted(second)
    assert len([name for name in first if name.endswith(".png")]) == 7
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_gives_different_targets(small_dataset, tmp_path):
    write_dataset(tmp_path, seed=1, n_train=3, n_val=2, n_test=2)
    for split in ("train", "val", "test"):
        a = [r["target"] for r in read_jsonl(small_dataset / f"{split}.jsonl")]
        b = [r["target"] for r in read_jsonl(tmp_path / f"{split}.jsonl")]
        assert a != b


def test_val_split_does_not_depend_on_n_train(tmp_path):
    write_dataset(tmp_path / "a", seed=3, n_train=1, n_val=2, n_test=1, preset="form")
    write_dataset(tmp_path / "b", seed=3, n_train=4, n_val=2, n_test=1, preset="form")
    for split in ("val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    for name in ("val_00000.png", "val_00001.png", "test_00000.png"):
        a, b = (tmp_path / run / "images" / name for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()


def test_invoice_arithmetic_is_consistent(invoice_targets):
    for target in invoice_targets:
        amounts = [Decimal(item["amount"]) for item in target["items"]]
        assert 1 <= len(amounts) <= 6
        for item in target["items"]:
            assert isinstance(item["quantity"], int) and item["quantity"] >= 1
            assert MONEY.match(item["amount"])
            if "unit_price" in item:
                assert MONEY.match(item["unit_price"])
                assert Decimal(item["unit_price"]) * item["quantity"] == Decimal(item["amount"])
        if "subtotal" in target:
            for key in ("subtotal", "tax", "total"):
                assert MONEY.match(target[key]), target[key]
            assert sum(amounts) == Decimal(target["subtotal"])
            assert Decimal(target["subtotal"]) + Decimal(target["tax"]) == Decimal(target["total"])
            assert target["currency"] in {"EUR", "USD", "GBP"}
        else:  # receipt: the total is the sum of the line amounts
            assert sum(amounts) == Decimal(target["total"])


def test_dates_are_iso(invoice_targets):
    for target in invoice_targets + targets("form", 20):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", target["date"])
        dt.date.fromisoformat(target["date"])


@pytest.mark.parametrize("preset", ["invoices", "form", "simple", "digits"])
def test_presets_yield_documented_keys(preset, invoice_targets):
    docs = invoice_targets if preset == "invoices" else targets(preset, 10)
    seen = [set(target) for target in docs]
    assert all(keys in PRESET_KEYS[preset] for keys in seen)
    # Every schema of the preset shows up (invoices: both invoice and receipt layouts).
    assert all(keys in seen for keys in PRESET_KEYS[preset])
    if preset in ("simple", "digits"):
        assert all(re.fullmatch(r"\d{5}", t["number"]) for t in docs)
    if preset == "simple":
        assert all(Decimal("10.00") <= Decimal(t["total"]) <= Decimal("99.99") for t in docs)
    if preset == "invoices":
        for target in (t for t in docs if "seller" in t):
            assert set(target["seller"]) == set(target["buyer"]) == {"name", "address"}
            assert all(set(i) == {"description", "quantity", "unit_price", "amount"} for i in target["items"])


@pytest.mark.parametrize("preset", ["invoices", "form", "simple", "digits"])
def test_images_exist_and_open(preset, small_dataset, tmp_path):
    out = small_dataset
    if preset != "invoices":
        out = tmp_path
        write_dataset(out, seed=0, n_train=2, n_val=1, n_test=1, preset=preset)
    for split in ("train", "val", "test"):
        for record in read_jsonl(out / f"{split}.jsonl"):
            assert record["image"].startswith(f"images/{split}_")
            with Image.open(out / record["image"]) as image:
                image.load()
                assert image.mode == "RGB"
                if preset == "simple":
                    assert image.size == (128, 128)
                elif preset == "digits":
                    assert image.size == (64, 64)
                elif preset == "form":
                    assert image.size == (256, 256)
                else:
                    assert 300 <= image.width <= 900 and image.height > image.width


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_dataset(tmp_path, seed=0, n_train=3, n_val=1, n_test=1, preset="simple")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(tmp_path, seed=0, n_train=1, n_val=1, n_test=1, preset="simple")
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 3  # untouched
    paths = write_dataset(tmp_path, seed=0, n_train=1, n_val=1, n_test=1, preset="simple", overwrite=True)
    assert paths == {s: tmp_path / f"{s}.jsonl" for s in ("train", "val", "test")}
    assert len(read_jsonl(paths["train"])) == 1
    # Images of the larger previous run are gone, so the folder matches the JSONL.
    assert sorted(p.name for p in (tmp_path / "images").glob("train_*")) == ["train_00000.png"]


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        write_dataset(tmp_path, seed=0, n_train=1, n_val=0, n_test=0, preset="nope")
    with pytest.raises(ValueError, match="preset"):
        make_document(random.Random(0), "nope")


def test_cli_runs_from_repo_root(tmp_path):
    cmd = [
        sys.executable,
        "scripts/make_invoices.py",
        "--out",
        str(tmp_path),
        "--seed",
        "0",
        "--n-train",
        "2",
        "--n-val",
        "1",
        "--n-test",
        "1",
        "--preset",
        "simple",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert len(result.stdout.splitlines()) == 3 and "train: 2" in result.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "overwrite" in again.stderr
