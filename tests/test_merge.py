"""Merging a LoRA adapter: the merged model answers exactly like base + adapter, and saves in the layouts a
server reads (native; for Mississippi also the original H2OVL layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(params=["mississippi", "llava_onevision"])
def trained_run(request, tiny_mississippi, tiny_llava, simple_docs, tmp_path, fresh_accelerate_state):
    """A 3-step LoRA run with a fully trained projector beside the adapter (PEFT modules_to_save)."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    checkpoint = {"mississippi": tiny_mississippi, "llava_onevision": tiny_llava}[request.param]
    run = tmp_path / "run"
    job = FineTuneRecipe(
        load_recipe(
            "quickstart",
            [
                f"model.family={request.param}",
                f"model.path={checkpoint}",
                f"data.train={simple_docs['train']}",
                f"data.val={simple_docs['val']}",
                f"data.test={simple_docs['test']}",
                f"output.dir={run}",
                "tuning.groups={vision: frozen, projector: full, llm: lora}",
                "tuning.lora.dropout=0",
                "optim.lr=5e-2",
                "train.max_steps=3",
                "train.batch_size=4",
                "eval.before_training=false",
                "eval.after_training=false",
            ],
        )
    )
    job.setup()
    job.train()
    job.save_final()
    return request.param, checkpoint, run


def test_merged_model_gives_the_same_answers_as_base_plus_adapter(trained_run, simple_docs, tmp_path):
    from finetune.errors import UserError
    from finetune.eval import evaluate_model
    from finetune.merge import merge_adapter

    family, checkpoint, run = trained_run
    merged = merge_adapter(str(run), tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["model_type"] != "peft"
    assert (merged / "prompt.json").is_file() and (merged / "chat_template.jinja").is_file()
    with pytest.raises(UserError, match="exists"):  # one line from the CLI, not a traceback
        merge_adapter(str(run), merged)

    common = {"max_new_tokens": 12, "report": False}
    evaluate_model(str(run), str(simple_docs["test"]), out_dir=tmp_path / "adapter", **common)
    evaluate_model(str(merged), str(simple_docs["test"]), out_dir=tmp_path / "merged-eval", family=family, **common)
    texts = {}
    for name in ("adapter", "merged-eval"):
        rows = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        texts[name] = [json.loads(row)["text"] for row in rows]
    assert len(texts["adapter"]) == 4 and texts["merged-eval"] == texts["adapter"]

    # Same logits, and not the base model's: the adapter and the projector trained beside it are in the merge.
    from finetune.loading import load_model_and_processor, resolve_model

    fam, processor, with_adapter = load_model_and_processor(resolve_model(str(run)))
    _, _, merged_model = load_model_and_processor(resolve_model(str(merged), family=family))
    base = fam.load_model(str(checkpoint)).eval()
    from finetune.data.dataset import Collator, DocumentDataset, prepare_samples

    prompt = json.loads((merged / "prompt.json").read_text())
    samples, _ = prepare_samples(
        simple_docs["test"],
        split="test",
        family=fam,
        processor=processor,
        instruction_text=prompt["instruction"],
        skeleton=prompt["skeleton"],
        max_length=4096,
    )
    batch = Collator(fam, processor.tokenizer.pad_token_id)(
        [
            DocumentDataset(samples, family=fam, processor=processor, instruction_text=prompt["instruction"])[i]
            for i in range(2)
        ]
    )
    batch.pop("index")
    with torch.no_grad():
        expected, got, untouched = (m(**batch).logits for m in (with_adapter, merged_model, base))
    # x(W + sBA) vs xW + s(xA)B: the same numbers summed in another order (fp32 reassociation, a few 1e-4 here).
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=3e-3)
    assert (untouched - expected).abs().max() > 100 * (got - expected).abs().max()

    if family == "mississippi":  # also in the original H2OVL layout, which reloads to the same model
        from finetune.models.mississippi.checkpoint import load_h2ovl

        original = load_h2ovl(merged / "original").eval()
        with torch.no_grad():  # stored in the source checkpoint's dtype (bfloat16 here): bf16-level agreement
            torch.testing.assert_close(original(**batch).logits, got, rtol=3e-2, atol=3e-2)


def test_merging_something_that_is_not_an_adapter_is_an_error(tiny_mississippi, tmp_path):
    from finetune.errors import UserError
    from finetune.merge import merge_adapter

    with pytest.raises(UserError, match="not a LoRA adapter"):
        merge_adapter(str(tiny_mississippi), tmp_path / "m", family="mississippi")


def test_predict_reads_files_folders_and_globs_as_json_lines(trained_run, simple_docs, tmp_path, capsys):
    import shutil

    from finetune.errors import UserError
    from finetune.predict import collect_images, main

    _, _, run = trained_run
    folder = tmp_path / "inbox"
    folder.mkdir()
    sources = sorted((simple_docs["test"].parent / "images").glob("test_*.png"))[:3]
    for name, source in zip("abc", sources, strict=True):
        shutil.copy(source, folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    images = collect_images([str(folder / "c.png"), str(folder), str(folder / "[ab].png")])
    assert [Path(p).name for p in images] == ["c.png", "a.png", "b.png"]  # in the given order, no repeats, no .txt

    records = main(
        [
            "--model",
            str(run),
            "--max-new-tokens",
            "48",
            "--batch-size",
            "2",
            "--constrained",
            "--max-string-length",
            "4",
            str(folder),
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == records and [Path(r["image"]).name for r in lines] == ["a.png", "b.png", "c.png"]
    assert all(r["valid_json"] and isinstance(r["prediction"], dict) for r in lines)  # constrained: always JSON
    with pytest.raises(UserError, match="no such file"):
        collect_images([str(tmp_path / "missing.png")])


def test_merged_model_has_what_vllms_loader_reads(trained_run, tmp_path):
    """vLLM cannot run here (no GPU, no vLLM CPU build for this machine), so the files are checked against what
    its H2OVL loader reads: its own H2OVLChatConfig (model_type h2ovl_chat; InternVLChatConfig fields, the vision
    and LLM configs built as PretrainedConfig), weights under the original prefixes, the image tokens."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, PretrainedConfig

    from finetune.merge import merge_adapter

    family, _, run = trained_run
    merged = merge_adapter(str(run), tmp_path / "merged")
    if family == "llava_onevision":  # vLLM reads the native transformers layout: config, weights, processor files
        config = json.loads((merged / "config.json").read_text())
        assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
        for name in (
            "model.safetensors",
            "preprocessor_config.json",
            "processor_config.json",
            "tokenizer.json",
            "chat_template.jinja",
        ):
            assert (merged / name).is_file(), name
        assert (
            json.loads((merged / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
        )
        return
    original = merged / "original"
    config = json.loads((original / "config.json").read_text())
    assert config["model_type"] == "h2ovl_chat" and config["architectures"] == ["H2OVLChatModel"]
    for key in (
        "select_layer",
        "force_image_size",
        "downsample_ratio",
        "template",
        "dynamic_image_size",
        "use_thumbnail",
        "ps_version",
        "min_dynamic_patch",
        "max_dynamic_patch",
        "use_msac",
    ):
        assert key in config, key
    vision, llm = PretrainedConfig(**config["vision_config"]), PretrainedConfig(**config["llm_config"])
    assert llm.architectures[0] in ("LlamaForCausalLM", "MistralForCausalLM") and vision.hidden_size > 0
    with safe_open(str(original / "model.safetensors"), "pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}  # noqa: SIM118 (not a dict)
    assert prefixes == {"vision_model", "mlp1", "language_model"}
    tokenizer = AutoTokenizer.from_pretrained(original, config=PretrainedConfig())
    for token in ("<IMG_CONTEXT>", "<img>", "</img>", "<|end|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
