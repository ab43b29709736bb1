"""Record what the ORIGINAL Ovis code computes on the tiny Ovis checkpoints, for tests/test_ovis.py.

Not part of the toolkit: it runs AIDC-AI's own code (github.com/AIDC-AI/Ovis, `ovis/` at commit bd0bfe2 for Ovis2,
d248e34 for Ovis1.6) in a scratch environment with the transformers it was written for, e.g.

    python3.11 -m venv /tmp/ovis-orig
    /tmp/ovis-orig/bin/pip install torch==2.13.0 transformers==4.46.3 safetensors pillow==12.3.0 numpy==1.26.4
    git -C Ovis archive bd0bfe2 ovis | tar -x -C /tmp/orig-ovis2
    git -C Ovis archive d248e34 ovis | tar -x -C /tmp/orig-ovis16
    .venv/bin/python scripts/make_tiny_checkpoint.py --family ovis --preset test-ovis2 --out /tmp/tiny-ovis2
    .venv/bin/python scripts/make_tiny_checkpoint.py --family ovis --preset test-ovis1.6 --out /tmp/tiny-ovis1.6
    OUT=tests/data/ovis_reference.json
    /tmp/ovis-orig/bin/python scripts/ovis_reference.py /tmp/orig-ovis2 /tmp/tiny-ovis2 ovis2 $OUT
    /tmp/ovis-orig/bin/python scripts/ovis_reference.py /tmp/orig-ovis16 /tmp/tiny-ovis1.6 ovis1.6 $OUT

The query is the original's for each variant: pages first, then the instruction; several pages labelled
`Image {i}: <image>` for Ovis2 as its model cards write them, bare `<image>` lines for Ovis1.6 (`image_lines`).

The original imports deepspeed at module level; a stub stands in for it (nothing of it runs on one CPU process). Its
conversation formatters accept only the real tokenizer classes; the tiny checkpoints' tokenizer is a
PreTrainedTokenizerFast over the same kind of tokenizer.json, so the check is relaxed for it.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

INSTRUCTION = 'Extract the details from the document image into JSON format: {"number": "", "total": ""}'


def pages(side: int) -> dict[str, list[Image.Image]]:
    """Pages whose pixels do not depend on the Pillow version where that is possible: an S×S noise page is one crop
    and is not resampled; a 2S×S page of two colours is two crops (not resampled) plus its thumbnail."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    halves = Image.new("RGB", (2 * side, side), (200, 30, 30))
    halves.paste((20, 40, 220), (side, 0, 2 * side, side))
    return {"one-page": [noise], "two-crops": [halves], "two-pages": [halves, noise]}


# Whether each variant's original labels the pages of a multi-image query (see image_lines).
LABELS_SEVERAL_PAGES = {"ovis2": True, "ovis1.6": False}


def image_lines(variant: str, num_images: int) -> str:
    """The query's page lines as each variant's original writes them. Ovis2 labels several images: its model cards
    (AIDC-AI/Ovis2-* README.md, "multiple-images input") build the query as
    `'\\n'.join([f'Image {i+1}: <image>' for i in range(len(images))]) + '\\n' + text`, and one image as
    `'<image>\\n' + text`. Ovis1.6 writes a bare `<image>\\n` per image (ovis/serve/runner.py@d248e34, "build
    query")."""
    if LABELS_SEVERAL_PAGES[variant] and num_images > 1:
        return "\n".join(f"Image {i + 1}: <image>" for i in range(num_images)) + "\n"
    return "<image>\n" * num_images


def pixel_digest(pixel_values: torch.Tensor) -> list[list[float]]:
    """Per crop, in order: the sum of its values and their sum weighted by position (so order and placement show)."""
    crops = pixel_values.double()
    weights = torch.arange(crops[0].numel(), dtype=torch.float64).reshape(crops[0].shape) / crops[0].numel()
    return [[round(float(c.sum()), 6), round(float((c * weights).sum()), 6)] for c in crops]


def main(original: str, checkpoint: str, variant: str, out: str) -> None:
    if variant not in LABELS_SEVERAL_PAGES:
        raise SystemExit(f"variant: ovis2 or ovis1.6, not {variant!r}")
    stub = Path(tempfile.mkdtemp()) / "deepspeed"
    stub.mkdir()
    (stub / "__init__.py").write_text("class zero:\n    Init = GatheredParameters = None\n")
    sys.path[:0] = [str(stub.parent), original]
    from ovis.model import conversation_formatter as formatters
    from ovis.model.modeling_ovis import Ovis

    for cls in (formatters.QwenConversationFormatter, formatters.GemmaConversationFormatter):
        cls.support_tokenizer_types = [*cls.support_tokenizer_types, "PreTrainedTokenizerFast"]
    model, info = Ovis.from_pretrained(
        checkpoint, torch_dtype=torch.float32, multimodal_max_length=8192, output_loading_info=True
    )
    # Every weight read from the file (a missing one would be initialised, and the comparison would mean little).
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise SystemExit(f"the original code did not load every weight: {info}")
    model = model.eval()
    side = model.get_visual_tokenizer().get_image_size()[0]
    record = {}
    for name, images in pages(side).items():
        query = image_lines(variant, len(images)) + INSTRUCTION
        prompt, input_ids, pixel_values = model.preprocess_inputs(query, images, max_partition=9)
        with torch.no_grad():
            mask = torch.ones(1, len(input_ids), dtype=torch.bool)
            _, embeds, _, merged_mask = model.merge_multimodal(input_ids[None], mask, None, [pixel_values])
            logits = model.llm(inputs_embeds=embeds, attention_mask=merged_mask).logits[0]
            generated = model.generate(
                input_ids[None],
                attention_mask=mask,
                pixel_values=[pixel_values],
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=model.text_tokenizer.pad_token_id,
            )[0]
        record[name] = {
            "prompt": prompt,
            "input_ids": input_ids.tolist(),
            "pixel_digest": pixel_digest(pixel_values),
            "argmax": logits.argmax(-1).tolist(),
            "logsumexp": [round(float(x), 6) for x in logits.logsumexp(-1)],
            "generated": generated.tolist(),
        }
    path = Path(out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[variant] = record
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
