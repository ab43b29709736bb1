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
