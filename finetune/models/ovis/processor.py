"""A processor for Ovis: its tokenizer, chat format and page preprocessing, usable like a transformers processor.

    processor = OvisProcessor.from_pretrained("AIDC-AI/Ovis2-1B")      # or a local folder, either layout
    batch = processor(images=[[page]], text=[processor.render_prompt("Read it", num_images=1)])

The original marks an image with `<image>` in the text and tokenizes the text around it chunk by chunk
(`ConversationFormatter._tokenize_with_image_symbol`); each `<image>` becomes
`[start, thumbnail, thumbnail-end, crop, column-sep, crop, …, row-sep, …, end]` (`construct_image_placeholders`).
The original's negative placeholder ids become real tokens here: one image token per visual token of a crop and five
indicator tokens — those of the `-hf` tokenizer when it has them, otherwise added to the tokenizer as special tokens
(their ids may lie past the LLM's vocabulary: the model never looks them up, see `modeling.OvisForConditionalGeneration
.embed`). `pixel_values` holds every crop of the batch in one [crops, 3, S, S] tensor, in the order of the tokens.

Chat formats (`conversation_formatter.py`): Gemma2 `<bos><start_of_turn>user\\n{q}<end_of_turn>\\n<start_of_turn>model
\\n` (the question stripped; a system prompt is an error), Qwen2 ChatML with the default system prompt "You are a
helpful assistant.". Images come first in the question, one `<image>\\n` each (`ovis/serve/runner.py`); for several
pages Ovis2 labels each `Image {i}: <image>\\n` (its model cards), Ovis1.6 does not (`image_lines`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PretrainedConfig

from finetune.errors import UserError
from finetune.models.base import pages_per_text
from finetune.models.hub import resolve_checkpoint
from finetune.models.ovis import image as ovis_image

CONFIG_NAME = "ovis_processor_config.json"
RECIPE_OPTIONS = ("max_partition", "page_labels")
PROCESSOR_PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]
IMAGE_TOKEN = "<image>"  # the original's placeholder in the text, and (as in the -hf tokenizer) the image token
INDICATOR_TOKENS = tuple(f"<ovis_visual_indicator_{i}>" for i in range(5))
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
END_OF_TURN = {"gemma2": "<end_of_turn>", "qwen2": "<|im_end|>"}


# The two formats as chat templates (for `apply_chat_template` and for whoever serves the model): an image part is
# `<image>\n` (labelled as `image_lines` does), images before the text; Gemma2's question is stripped as the original
# formatter strips it.
def _content(labels: bool) -> str:
    # With labels, the image parts are a list, so that the loop knows its length.
    images = "message['content'] | selectattr('type', 'equalto', 'image')" + (" | list" if labels else "")
    label = "{%- if loop.length > 1 -%}{%- set content.text = content.text + 'Image ' + loop.index | string + ': ' -%}"
    return (
        "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
        "{%- else -%}{%- set content = namespace(text='') -%}"
        "{%- for part in "
        + images
        + " -%}"
        + (label + "{%- endif -%}" if labels else "")
        + "{%- set content.text = content.text + '<image>\\n' -%}{%- endfor -%}"
        "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}"
        "{%- set content.text = content.text + part['text'] -%}{%- endfor -%}"
        "{%- set content = content.text -%}{%- endif -%}"
    )


def _qwen2_template(labels: bool) -> str:
    return (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\n" + QWEN_SYSTEM_PROMPT + "<|im_end|>\\n' }}{%- endif -%}"
        "{%- for message in messages -%}"
        + _content(labels=labels)
        + "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHAT_TEMPLATES = {
    "gemma2": (
        "{{- '<bos>' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{{ raise_exception('Gemma does not support system prompt') }}{%- endif -%}"
        + _content(labels=False)
        + "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{ '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    "qwen2": _qwen2_template(labels=True),
}
# What a model trained with bare page lines (`page_labels` false) is served with.
UNLABELLED_CHAT_TEMPLATES = {**CHAT_TEMPLATES, "qwen2": _qwen2_template(labels=False)}


@dataclass
class OvisImageSettings:
    chat_format: str = "qwen2"  # gemma2 | qwen2
    side: int = 448  # crop size S
    tokens_per_crop: int = 256  # visual tokens per crop: ceil(S / patch / hidden_stride)²
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    rescale_factor: float = 1 / 255
    max_partition: int = 9  # at most this many crops per page (plus the thumbnail); the recipe's memory cap
    resample: int = 3  # PIL's bicubic, as the checkpoints' image processors say
    # Several pages labelled `Image {i}: ` (Ovis2, as its cards write them); False: bare lines, as every folder saved
    # before labels existed was trained (a saved config without the key reads as False).
    page_labels: bool = True

    def normalisation(self) -> ovis_image.Normalisation:
        return ovis_image.Normalisation(
            self.side, tuple(self.image_mean), tuple(self.image_std), self.rescale_factor, self.resample
        )


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None


def settings_from_checkpoint(folder: Path, where: str) -> OvisImageSettings:
    """Settings from an original (`model_type: ovis`) or `-hf` (`ovis2`) checkpoint's config.json and
    preprocessor_config.json."""
    from finetune.models.ovis.config import read_checkpoint_config  # the model config and the processor agree

    layout = read_checkpoint_config(folder, where)
    pre_file = folder / "preprocessor_config.json"
    if not pre_file.is_file():
        raise UserError(f"{where}: no preprocessor_config.json (Ovis checkpoints keep the image settings there)")
    pre = _read_json(pre_file)
    if pre.get("do_center_crop"):
        raise UserError(f"{pre_file}: do_center_crop: true is not supported (the original refuses it too)")
    # The original's crop side: CLIP's processor (AIMv2) names it crop_size, SigLIP's (and the -hf one's) size.
    sizes = pre.get("crop_size") if layout.backbone == "aimv2" and "crop_size" in pre else pre.get("size", {})
    if isinstance(sizes, int):  # an old-style bare number
        sizes = {"height": sizes}
    if not isinstance(sizes, dict):
        raise UserError(f"{pre_file}: size / crop_size must be an object or a number, not {sizes!r}")
    side = int(sizes.get("height") or sizes.get("shortest_edge") or layout.image_size)
    return OvisImageSettings(
        chat_format=layout.chat_format,
        side=side,
        tokens_per_crop=layout.tokens_per_crop(side),
        image_mean=list(pre.get("image_mean", [0.5, 0.5, 0.5])),
        image_std=list(pre.get("image_std", [0.5, 0.5, 0.5])),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        resample=int(pre.get("resample", 3)),
    )


class OvisProcessor:
    """Tokenizer + Ovis's partitioning and normalisation + its chat format."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, settings: OvisImageSettings, token_ids: dict[str, int] | None = None):
        if settings.chat_format not in END_OF_TURN:
            raise UserError(f"chat_format: {settings.chat_format!r} is not one of {sorted(END_OF_TURN)}")
        self.tokenizer = tokenizer
        self.settings = settings
        # Always the original formatter's format: a Qwen tokenizer's own template has another default system prompt.
        templates = CHAT_TEMPLATES if settings.page_labels else UNLABELLED_CHAT_TEMPLATES
        tokenizer.chat_template = templates[settings.chat_format]
        tokens = (IMAGE_TOKEN, *INDICATOR_TOKENS)
        if token_ids is None:  # the original tokenizer has none of them: added, in this order, as special tokens
            missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
        self.token_ids = token_ids
        self.image_token_id = token_ids[IMAGE_TOKEN]
        self.indicator_ids = [token_ids[t] for t in INDICATOR_TOKENS]

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, **overrides) -> OvisProcessor:
        """Load from a folder or Hub id in either layout; `overrides` set image settings (e.g. max_partition=4)."""
        folder = resolve_checkpoint(path, revision, allow_patterns=PROCESSOR_PATTERNS)
        # An empty config: AutoTokenizer would otherwise read config.json, whose auto_map points at remote code.
        tokenizer = AutoTokenizer.from_pretrained(folder, config=PretrainedConfig(), trust_remote_code=False)
        ours = folder / CONFIG_NAME
        saved_ids = None
        if ours.is_file():
            saved = _read_json(ours)
            saved_ids = saved.pop("token_ids", None)
            unknown = set(saved) - set(OvisImageSettings.__dataclass_fields__)
            if unknown:
                raise UserError(f"{ours}: unknown setting(s) {sorted(unknown)}")
            settings = OvisImageSettings(**{"page_labels": False, **saved})  # saved before labels: trained bare
        else:
            settings = settings_from_checkpoint(folder, path)
        # Only the crop cap is the recipe's to choose; the rest are facts of the checkpoint (its crop size, token
        # count and normalisation), which a change would make the model see pages it was not trained on.
        unknown = set(overrides) - set(RECIPE_OPTIONS)
        if unknown:
            raise UserError(
                f"model.processor: unknown Ovis processor option(s) {sorted(unknown)}; known: {list(RECIPE_OPTIONS)}"
            )
        cap = overrides.get("max_partition", settings.max_partition)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise UserError(f"model.processor.max_partition: {cap!r} (must be a whole number, at least 1)")
        settings.max_partition = cap
        labels = overrides.get("page_labels", settings.page_labels)
        if not isinstance(labels, bool):
            raise UserError(f"model.processor.page_labels: {labels!r} (must be true or false)")
        settings.page_labels = labels
        # A checkpoint says its ids: the -hf layout fixes them in config.json; the original's are added (in a fixed
        # order, after the vocabulary, so every load of the same tokenizer gives the same ids). A folder with no model
        # config (an adapter's) has the tokenizer saved with them and the ids recorded beside it.
        if (folder / "config.json").is_file():
            from finetune.models.ovis.config import read_checkpoint_config

            token_ids = read_checkpoint_config(folder, str(path)).token_ids
        else:
            token_ids = saved_ids
            if token_ids and any(i >= len(tokenizer) for i in token_ids.values()):
                raise UserError(f"{ours}: token_ids {token_ids} are not in the tokenizer saved beside it")
        return cls(tokenizer, settings, token_ids)

    def save_pretrained(self, out_dir) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        self.save_settings(out_dir)

    def save_settings(self, out_dir) -> None:
        """The image settings alone (`ovis_processor_config.json`), beside a checkpoint's own tokenizer files."""
        saved = {**asdict(self.settings), "token_ids": self.token_ids}
        (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(saved, indent=2) + "\n")

    # --- text ----------------------------------------------------------------------------------------------------
    @property
    def end_of_turn(self) -> str:
        return END_OF_TURN[self.settings.chat_format]

    def render_prompt(self, instruction: str, num_images: int) -> str:
        """The prompt up to the assistant's turn, as the original formatter writes it with an empty preface."""
        question = self.image_lines(num_images) + instruction
        if self.settings.chat_format == "gemma2":
            return f"<bos><start_of_turn>user\n{question.strip()}<end_of_turn>\n<start_of_turn>model\n"
        return (
            f"<|im_start|>system\n{QWEN_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def image_lines(self, num_images: int) -> str:
        """The question's page lines, before the instruction: `<image>\\n` per page. Ovis2 (Qwen2) labels several
        `Image {i}: <image>\\n`: AIDC-AI/Ovis2-* model cards (README.md), "multiple-images input". Ovis1.6 (Gemma2)
        does not: its card shows one image, and AIDC-AI/Ovis ovis/serve/runner.py@d248e34 l.56-62 writes bare lines.
        `settings.page_labels` False: bare lines (a model trained before labels were written)."""
        if num_images > 1 and self.settings.chat_format == "qwen2" and self.settings.page_labels:
            return "".join(f"Image {i}: {IMAGE_TOKEN}\n" for i in range(1, num_images + 1))
        return f"{IMAGE_TOKEN}\n" * num_images

    def _text_chunks(self, text: str) -> list[list[int]]:
        """Token ids of the text between `<image>` placeholders, each chunk tokenised alone (as the original)."""
        return [self.tokenizer(chunk, add_special_tokens=False)["input_ids"] for chunk in text.split(IMAGE_TOKEN)]

    def image_placeholders(self, grid: tuple[int, int]) -> list[int]:
        """The ids standing for one page of this grid (`construct_image_placeholders`, one crop = T image tokens)."""
        start, thumb_end, col_sep, row_sep, end = self.indicator_ids
        crop = [self.image_token_id] * self.settings.tokens_per_crop
        ids = [start, *crop, thumb_end]
        rows, cols = grid
        if rows * cols > 1:
            for r in range(rows):
                for c in range(cols):
                    ids += crop
                    if c < cols - 1:
                        ids.append(col_sep)
                if r < rows - 1:
                    ids.append(row_sep)
        ids.append(end)
        return ids

    def grids_for(self, image_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Grids for (width, height) sizes, without touching pixels."""
        s = self.settings
        return [ovis_image.best_grid(w, h, s.side, s.max_partition) for w, h in image_sizes]

    def tiles_for(self, image_sizes: list[tuple[int, int]]) -> list[int]:
        """Images the backbone sees per page (crops plus the thumbnail), without touching pixels; named like the
        Mississippi processor's, whose tiles play the same part (the benchmarks count tower passes with it)."""
        return [ovis_image.num_crops(grid) for grid in self.grids_for(image_sizes)]

    def encode(self, text: str, grids: list[tuple[int, int]]) -> list[int]:
        chunks = self._text_chunks(text)
        if len(chunks) - 1 != len(grids):
            raise ValueError(f"text has {len(chunks) - 1} {IMAGE_TOKEN} placeholders for {len(grids)} images")
        ids = list(chunks[0])
        for grid, chunk in zip(grids, chunks[1:], strict=True):
            ids += self.image_placeholders(grid) + chunk
        return ids

    # --- images --------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: list[list[Image.Image]] | list[Image.Image] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = False,
        padding_side: str | None = None,
        add_special_tokens: bool = False,  # the prompt carries its own <bos> (Gemma2), as the original's does
        **pad_kwargs,
    ) -> BatchFeature:
        """Ids (and attention mask) for each text with its pages' placeholders expanded, and every crop's pixels.
        Texts of unequal length need `padding` (as transformers' processors do); the pad token is the tokenizer's."""
        texts, images = pages_per_text(images, text)
        norm, pixels, rows = self.settings.normalisation(), [], []
        for sample_images, sample_text in zip(images, texts, strict=True):
            grids = []
            for page in sample_images:
                crops, grid = ovis_image.preprocess(page, norm, self.settings.max_partition)
                pixels.append(crops)
                grids.append(grid)
            rows.append(self.encode(sample_text, grids))
        if padding or len({len(r) for r in rows}) > 1:
            if not padding:
                raise ValueError("texts of unequal token length: pass padding=True (or batch with a collator)")
            side = {"padding_side": padding_side} if padding_side else {}
            data = dict(
                self.tokenizer.pad({"input_ids": rows}, padding=padding, return_tensors="pt", **side, **pad_kwargs)
            )
        else:
            data = {
                "input_ids": torch.tensor(rows),
                "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long),
            }
        if pixels:
            data["pixel_values"] = torch.cat(pixels)
        return BatchFeature(data, tensor_type=None if return_tensors == "pt" else return_tensors)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
