"""Multi-page prompts as each family's original labels (or does not label) several images in one question.

- Mississippi: `Image-1: <image>\\nImage-2: <image>\\n…` (H2OVL-Mississippi-2B's model card, multi-image example;
  InternVL's convention, e.g. OpenGVLab/InternVL internvl_chat/eval/mpdocvqa/evaluate_vqa.py for multi-page documents).
- Ovis2: `Image 1: <image>\\nImage 2: <image>\\n…` (the AIDC-AI/Ovis2-* model cards, "multiple-images input");
  Ovis1.6: bare `<image>\\n` lines (its card shows one image; AIDC-AI/Ovis ovis/serve/runner.py writes bare lines).
- LLaVA-OneVision: bare `<image><image>…` (llava-hf's chat_template.json): unchanged.

A single page is never labelled, in every family: its prompt is what it was before labels were introduced. That the
labels carry no loss label and are counted exactly is the family contract's (test_family_contract.py, 1 and 4).
"""

from __future__ import annotations

import pytest

from finetune.models import get_family

INSTRUCTION = 'Extract the details into JSON format: {"number": "", "total": ""}'

# family, tiny preset → the user turn's text before the instruction, for 1, 2 and 3 pages.
EXPECTED_PAGE_LINES = {
    ("mississippi", "test"): {
        1: "<image>\n",
        2: "Image-1: <image>\nImage-2: <image>\n",
        3: "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n",
    },
    ("ovis", "test-ovis2"): {
        1: "<image>\n",
        2: "Image 1: <image>\nImage 2: <image>\n",
        3: "Image 1: <image>\nImage 2: <image>\nImage 3: <image>\n",
    },
    ("ovis", "test-ovis1.6"): {1: "<image>\n", 2: "<image>\n<image>\n", 3: "<image>\n<image>\n<image>\n"},
    ("llava_onevision", "test"): {1: "<image>", 2: "<image><image>", 3: "<image><image><image>"},
}
# The turn around them (as before labels were introduced).
TURNS = {
    "mississippi": "<|prompt|>{pages}{instruction}<|end|><|answer|>",
    "test-ovis2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{pages}{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "test-ovis1.6": "<bos><start_of_turn>user\n{pages}{instruction}<end_of_turn>\n<start_of_turn>model\n",
    "llava_onevision": "<|im_start|>user {pages}\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module", params=list(EXPECTED_PAGE_LINES), ids=lambda key: f"{key[0]}-{key[1]}")
def case(request, tmp_path_factory):
    name, preset = request.param
    family = get_family(name)
    path = family.build_tiny_checkpoint(tmp_path_factory.mktemp(f"{name}-{preset}"), **family.tiny_presets[preset])
    return family, family.load_processor(str(path)), request.param


@pytest.mark.parametrize("num_pages", [1, 2, 3])
def test_prompt_labels_pages_as_the_original_does(case, num_pages):
    family, processor, key = case
    turn = TURNS.get(key[1], TURNS.get(key[0]))
    expected = turn.format(pages=EXPECTED_PAGE_LINES[key][num_pages], instruction=INSTRUCTION)
    assert family.render_prompt(processor, INSTRUCTION, num_pages) == expected
    # The saved chat template writes the same, so whoever serves the model prompts it as it was trained.
    user = {"role": "user", "content": [{"type": "image"}] * num_pages + [{"type": "text", "text": INSTRUCTION}]}
    assert processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False) == expected


def test_interleaved_pages_are_numbered_in_order_in_the_mississippi_template():
    """H2OGPT2's template keeps the parts' order (text may come between pages); the labels count the pages."""
    from jinja2 import Template

    from finetune.models.mississippi.processor import H2OGPT2_CHAT_TEMPLATE

    parts = [
        {"type": "image"},
        {"type": "text", "text": "first, then "},
        {"type": "image"},
        {"type": "text", "text": "x"},
    ]
    text = Template(H2OGPT2_CHAT_TEMPLATE).render(messages=[{"role": "user", "content": parts}])
    assert text == "<|prompt|>Image-1: <image>\nfirst, then Image-2: <image>\nx<|end|>"
    one = [{"type": "image"}, {"type": "text", "text": "x"}]
    assert Template(H2OGPT2_CHAT_TEMPLATE).render(messages=[{"role": "user", "content": one}]) == (
        "<|prompt|><image>\nx<|end|>"
    )


LABELLING = [key for key in EXPECTED_PAGE_LINES if key in (("mississippi", "test"), ("ovis", "test-ovis2"))]


@pytest.fixture(scope="module", params=LABELLING, ids=lambda key: f"{key[0]}-{key[1]}")
def labelling_checkpoint(request, tmp_path_factory):
    name, preset = request.param
    family = get_family(name)
    path = family.build_tiny_checkpoint(tmp_path_factory.mktemp(f"{name}-{preset}"), **family.tiny_presets[preset])
    return family, path, request.param


def _bare_prompt(key, num_pages: int) -> str:
    turn = TURNS.get(key[1], TURNS.get(key[0]))
    return turn.format(pages=("<image>\n" * num_pages), instruction=INSTRUCTION)


def test_page_labels_off_writes_bare_lines_in_prompt_and_template(labelling_checkpoint):
    family, path, key = labelling_checkpoint
    processor = family.load_processor(str(path), page_labels=False)
    assert family.prompt_format(processor) == {"page_labels": False}
    user = {"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": INSTRUCTION}]}
    assert family.render_prompt(processor, INSTRUCTION, 3) == _bare_prompt(key, 3)
    assert processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False) == _bare_prompt(key, 3)
    with pytest.raises(Exception, match="page_labels"):
        family.load_processor(str(path), page_labels="yes")


def test_a_folder_saved_before_page_labels_is_prompted_bare(labelling_checkpoint, tmp_path):
    """A model folder whose processor config predates `page_labels` was trained on bare lines: read as such."""
    import json

    family, path, key = labelling_checkpoint
    labelled = family.load_processor(str(path))
    assert family.prompt_format(labelled) == {"page_labels": True}  # the original checkpoint: the original's labels
    saved = tmp_path / "saved"
    labelled.save_pretrained(saved)
    assert family.prompt_format(family.load_processor(str(saved))) == {"page_labels": True}
    (config,) = [p for p in saved.glob("*_processor_config.json")]
    settings = json.loads(config.read_text())
    del settings["page_labels"]  # as written before the setting existed
    config.write_text(json.dumps(settings))
    legacy = family.load_processor(str(saved))
    assert family.render_prompt(legacy, INSTRUCTION, 2) == _bare_prompt(key, 2)
    assert family.legacy_prompt_format() == {"page_labels": False}


def test_a_resume_keeps_the_prompt_format_its_checkpoint_records(tmp_path):
    """A checkpoint records the format; one written before formats were recorded resumes with the family's legacy
    one, so a resumed run's prompts (and token counts) do not change mid-run."""
    import json
    from types import SimpleNamespace

    from finetune.training.checkpoint import STATE_FILE, TrainerState
    from finetune.training.runner import FineTuneRecipe

    family = get_family("mississippi")
    runner = SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(processor={"max_tiles": 2})), family=family)
    assert FineTuneRecipe._processor_options(runner, None) == {"max_tiles": 2}
    TrainerState(global_step=3, prompt_format={"page_labels": True}).save(tmp_path)
    assert FineTuneRecipe._processor_options(runner, tmp_path) == {"max_tiles": 2, "page_labels": True}
    (tmp_path / STATE_FILE).write_text(json.dumps({"global_step": 3, "stage": 0, "stage_step": 3, "epoch": 0}))
    assert FineTuneRecipe._processor_options(runner, tmp_path) == {"max_tiles": 2, "page_labels": False}
