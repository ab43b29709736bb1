"""A processor for H2OVL-Mississippi: its tokenizer plus its tiling, usable like a transformers processor.

    processor = H2OVLProcessor.from_pretrained("h2oai/h2ovl-mississippi-800m")   # or a local folder
    batch = processor(images=[[page]], text=["<|prompt|><image>\\nRead it<|end|><|answer|>"])

Each `<image>` in a text is replaced by `<img>` + `<IMG_CONTEXT>` × (tokens per tile · tiles) + `</img>`, the
way the original `model.chat` does; `pixel_values` holds every tile of the batch in one flat tensor.

Settings come from `h2ovl_processor_config.json` when present (our saves), else from the original checkpoint's
`config.json` (`force_image_size`, `downsample_ratio`, `min/max_dynamic_patch`, `use_msac`, vision patch size).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PretrainedConfig

from finetune.errors import UserError
from finetune.models.base import pages_per_text
from finetune.models.hub import resolve_checkpoint
from finetune.models.mississippi import config as h2ovl_config
from finetune.models.mississippi import image as h2ovl_image

# `h2ogpt2` (H2OVL's conversation.py: roles <|prompt|> / <|answer|>, separator <|end|>, system message prepended
# as is, no separator after it). Whether the Hub tokenizer adds BOS is unconfirmed; this one does not. Content may be
# a string or a list of parts; an image part becomes "<image>\n" (labelled when there are several: `image_lines`),
# which the processor expands.
H2OGPT2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='', images=0) -%}"
    "{%- set several = message['content'] | selectattr('type', 'equalto', 'image') | list | length > 1 -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set content.images = content.images + 1 -%}"
    "{%- if several -%}{%- set content.text = content.text + 'Image-' + content.images | string + ': ' -%}{%- endif -%}"
    "{%- set content.text = content.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set content.text = content.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ content }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|prompt|>' + content + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|answer|>' + content + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|answer|>' }}{%- endif -%}"
)

# What a model trained with bare page lines (`page_labels` false) is served with.
_PAGE_LABEL = (
    "{%- if several -%}{%- set content.text = content.text + 'Image-' + content.images | string + ': ' -%}{%- endif -%}"
)
UNLABELLED_H2OGPT2_CHAT_TEMPLATE = H2OGPT2_CHAT_TEMPLATE.replace(_PAGE_LABEL, "")

CONFIG_NAME = "h2ovl_processor_config.json"
# What a processor reads from a Hub checkpoint: configs and tokenizer, not the weights.
PROCESSOR_PATTERNS = ["*.json", "tokenizer.model", "*.jinja"]
IMAGE_PLACEHOLDER = "<image>"


def image_lines(num_images: int, *, labelled: bool = True) -> str:
    """The user turn's page lines: `<image>\\n` for one page; for several, each labelled `Image-{i}: <image>\\n`
    (bare with `labelled=False`: a model trained before labels were written).
    Source: H2OVL-Mississippi-2B's model card, multi-image example (InternVL's convention that H2OVL builds on, as in
    OpenGVLab/InternVL internvl_chat/eval/mpdocvqa/evaluate_vqa.py, `VQADataset.__getitem__`, for multi-page documents).
    """
    if num_images == 1 or not labelled:
        return f"{IMAGE_PLACEHOLDER}\n" * num_images
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1))


@dataclass
class H2OVLImageSettings:
    tile_size: int = 448
    tokens_per_tile: int = 256
    min_tiles: int = 1
    max_tiles: int = 6
    use_msac: bool = False
    max_tiles_per_image: int | None = None  # memory cap from the recipe (lowers max_tiles)
    # Several pages labelled `Image-{i}: ` (the original's convention); False: bare lines, as every folder saved before
    # labels existed was trained (a saved config without the key reads as False).
    page_labels: bool = True

    @classmethod
    def from_original_config(cls, config: dict) -> H2OVLImageSettings:
        return cls(
            tile_size=h2ovl_config.tile_size(config),
            tokens_per_tile=h2ovl_config.tokens_per_tile(config),
            min_tiles=int(config.get("min_dynamic_patch", 1)),
            max_tiles=int(config.get("max_dynamic_patch", 6)),
            use_msac=bool(config.get("use_msac", False)),
        )


class H2OVLProcessor:
    """Tokenizer + H2OVL image preprocessing (dynamic tiles, MSAC, ImageNet normalisation)."""

    image_token = h2ovl_image.IMG_CONTEXT

    def __init__(self, tokenizer, settings: H2OVLImageSettings):
        # The original keeps its template in conversation.py, not the tokenizer; ours (either variant) follows the
        # settings' page labels.
        if tokenizer.chat_template in (None, H2OGPT2_CHAT_TEMPLATE, UNLABELLED_H2OGPT2_CHAT_TEMPLATE):
            labelled = settings.page_labels
            tokenizer.chat_template = H2OGPT2_CHAT_TEMPLATE if labelled else UNLABELLED_H2OGPT2_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        missing = [
            t
            for t in (h2ovl_image.IMG_START, h2ovl_image.IMG_END, self.image_token)
            if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
        ]
        if missing:
            raise ValueError(f"tokenizer lacks the image tokens {missing}")

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, **overrides) -> H2OVLProcessor:
        """Load from a folder or Hub id; `overrides` set image settings (e.g. max_tiles_per_image=4)."""
        folder = resolve_checkpoint(path, revision, allow_patterns=PROCESSOR_PATTERNS)
        # An empty config: AutoTokenizer would otherwise read config.json, whose auto_map points at remote code.
        tokenizer = AutoTokenizer.from_pretrained(folder, config=PretrainedConfig(), trust_remote_code=False)
        settings = cls._read_settings(folder, path)
        unknown = set(overrides) - set(asdict(settings))
        if unknown:
            known = sorted(asdict(settings))
            raise UserError(f"model.processor: unknown H2OVL processor option(s) {sorted(unknown)}; known: {known}")
        if not isinstance(overrides.get("page_labels", True), bool):
            raise UserError(f"model.processor.page_labels: {overrides['page_labels']!r} (must be true or false)")
        for key, value in overrides.items():
            setattr(settings, key, value)
        return cls(tokenizer, settings)

    @staticmethod
    def _read_settings(folder: Path, path: str) -> H2OVLImageSettings:
        ours = folder / CONFIG_NAME
        if ours.is_file():
            return H2OVLImageSettings(**{"page_labels": False, **json.loads(ours.read_text())})
        original = folder / "config.json"
        config = json.loads(original.read_text()) if original.is_file() else {}
        if "vision_config" not in config:
            raise UserError(f"{path}: not an H2OVL-Mississippi checkpoint (neither {CONFIG_NAME} nor its config.json)")
        return H2OVLImageSettings.from_original_config(config)

    def save_pretrained(self, out_dir) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        (out_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    # --- processing --------------------------------------------------------------------------------------
    def tiles_for(self, image_sizes: list[tuple[int, int]]) -> list[int]:
        """Tiles per image for (width, height) sizes of one prompt, without touching pixels."""
        s = self.settings
        return [
            h2ovl_image.count_tiles(
                w,
                h,
                min_tiles=s.min_tiles,
                max_tiles=s.max_tiles,
                use_msac=s.use_msac,
                num_images=len(image_sizes),
                tile_size=s.tile_size,
                max_tiles_per_image=s.max_tiles_per_image,
            )
            for w, h in image_sizes
        ]

    def decode_size(self, size: tuple[int, int], num_images: int = 1) -> tuple[int, int]:
        """The least size a page of `size` may be decoded at (`h2ovl_image.decode_size`, these settings)."""
        s = self.settings
        return h2ovl_image.decode_size(
            *size,
            min_tiles=s.min_tiles,
            max_tiles=s.max_tiles,
            use_msac=s.use_msac,
            num_images=num_images,
            tile_size=s.tile_size,
            max_tiles_per_image=s.max_tiles_per_image,
        )

    def expand(self, text: str, tiles: list[int]) -> str:
        """Replace each `<image>` with its image tokens (as many placeholders as images, or an error)."""
        if text.count(IMAGE_PLACEHOLDER) != len(tiles):
            raise ValueError(
                f"text has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders for {len(tiles)} images"
            )
        for n in tiles:
            text = text.replace(
                IMAGE_PLACEHOLDER, h2ovl_image.expand_image_placeholder(n, self.settings.tokens_per_tile), 1
            )
        return text

    def __call__(
        self,
        images: list[list[Image.Image]] | list[Image.Image] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        **tokenizer_kwargs,
    ):
        texts, images = pages_per_text(images, text)
        s = self.settings
        pixel_values, expanded = [], []
        for sample_images, sample_text in zip(images, texts, strict=True):
            tiles: list[int] = []
            if sample_images:
                pixels, tiles = h2ovl_image.preprocess(
                    sample_images,
                    tile_size=s.tile_size,
                    min_tiles=s.min_tiles,
                    max_tiles=s.max_tiles,
                    use_msac=s.use_msac,
                    max_tiles_per_image=s.max_tiles_per_image,
                )
                pixel_values.append(pixels)
            expanded.append(self.expand(sample_text, tiles))
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **tokenizer_kwargs))
        if pixel_values:
            data["pixel_values"] = torch.cat(pixel_values)
        return BatchFeature(data)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)
