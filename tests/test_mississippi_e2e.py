"""Mississippi end to end through `accelerate launch finetune/train.py recipe=invoices model.path=<tiny>`: a LoRA
run completes and saves, on both shapes (overfitting 8 forms is in test_family_contract.py, for every family)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["test", "test-2b"])
def tiny(request, tmp_path_factory):
    from finetune.models import get_family

    family = get_family("mississippi")
    return family.build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **family.tiny_presets[request.param])


def args(tiny, docs, out, **overrides):
    values = {
        "model.path": str(tiny),
        "data.train": str(docs["train"]),
        "data.val": str(docs["train"]),
        "data.test": "null",
        "output.dir": str(out),
        "eval.max_new_tokens": 32,
        "eval.batch_size": 8,
        "train.precision": "fp32",
        "tuning.gradient_checkpointing": False,
        "train.checkpoint_every": "null",
        "optim.warmup_ratio": 0.0,
        "train.log_every": 1,
        **overrides,
    }
    return ["recipe=invoices"] + [f"{k}={v}" for k, v in values.items()]


def test_lora_run_completes_and_saves_an_adapter(tiny, simple_docs, tmp_path):
    out = tmp_path / "lora"
    run_train(
        args(
            tiny,
            simple_docs,
            out,
            **{
                "train.max_steps": 4,
                "train.batch_size": 4,
                "tuning.gradient_checkpointing": True,
                "eval.max_new_tokens": 4,
            },
        )
    )
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert json.loads((out / "final" / "prompt.json").read_text())["instruction"].startswith("Extract the details")
