"""Publishing: the folder an upload would send holds everything a loader needs and a card the Hub parses; the
adapter reloads from it with the trained logits; no secret from the environment ends up in a run or its logs."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

FAKE_HF_TOKEN = "hf_FAKEtoken1234567890abcdefSECRET"
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdefWANDB"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_mississippi, simple_docs):
    """A LoRA run trained as a user runs it, with fake secrets in the environment."""
    import os

    from tests.conftest import run_train

    run = tmp_path_factory.mktemp("publish") / "run"
    old = {k: os.environ.get(k) for k in ("HF_TOKEN", "WANDB_API_KEY")}
    os.environ.update(HF_TOKEN=FAKE_HF_TOKEN, WANDB_API_KEY=FAKE_WANDB_KEY)
    try:
        result = run_train(
            [
                "recipe=quickstart",
                f"model.path={tiny_mississippi}",
                f"data.train={simple_docs['train']}",
                f"data.val={simple_docs['val']}",
                f"data.test={simple_docs['test']}",
                f"output.dir={run}",
                "tuning.groups={vision: frozen, projector: full, llm: lora}",
                "train.max_steps=3",
                "train.batch_size=4",
                "eval.max_new_tokens=8",
                "tracking.report_to=[tensorboard]",
            ]
        )
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return run, result.stdout + result.stderr


def test_dry_run_folder_has_everything_a_loader_needs_and_a_parseable_card(lora_run, capsys):
    from huggingface_hub import ModelCard

    from finetune.publish import main

    run, _ = lora_run
    folder = main(["--run", str(run), "--repo", "me/invoice-reader", "--dry-run"])
    assert "dry run: nothing uploaded" in capsys.readouterr().err  # a message: stderr
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "h2ovl_processor_config.json",
        "prompt.json",
        "training_recipe.yaml",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "image-text-to-text"
    assert (
        data["base_model"] == json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
        and data["license"] == "apache-2.0"
    )
    metrics = json.loads((run / "metrics.json").read_text())["after"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["json_exact_match"] == metrics["json_exact_match"] and "field_f1" in results
    for section in ("## Training", "## Evaluation", "## Usage", "vllm serve", "PeftModel.from_pretrained"):
        assert section in card.text, section
    # Offline (the tests set HF_HUB_OFFLINE=1), a real publish stops at the folder and says so.
    main(["--run", str(run), "--repo", "me/invoice-reader"])
    assert "offline (HF_HUB_OFFLINE): nothing uploaded" in capsys.readouterr().err


def test_adapter_reloaded_from_the_published_folder_gives_the_trained_logits(lora_run, tiny_mississippi):
    from peft import PeftModel

    from finetune.models import get_family
    from finetune.publish import build_publish_folder

    run, _ = lora_run
    folder = build_publish_folder(run, "me/invoice-reader")
    family = get_family("mississippi")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        published = PeftModel.from_pretrained(family.load_model(str(tiny_mississippi)), folder).eval()(**batch).logits
        trained = (
            PeftModel.from_pretrained(family.load_model(str(tiny_mississippi)), run / "final").eval()(**batch).logits
        )
        base = family.load_model(str(tiny_mississippi)).eval()(**batch).logits
    torch.testing.assert_close(published, trained, rtol=0, atol=0)
    assert not torch.allclose(published, base, atol=1e-4)


def test_no_secret_reaches_the_run_folder_the_publish_folder_or_the_logs(lora_run):
    from finetune.publish import build_publish_folder

    run, logs = lora_run
    build_publish_folder(run, "me/invoice-reader", merged=True)
    build_publish_folder(run, "me/invoice-reader")
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and any("merged" in p.parts for p in files)
    for secret in (FAKE_HF_TOKEN, FAKE_WANDB_KEY):
        assert secret not in logs
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, leaked
