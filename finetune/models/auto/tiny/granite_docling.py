"""Tiny random Granite-Docling in the layout of ibm-granite/granite-docling-258M (Idefics3ForConditionalGeneration).

The Hub repo's config.json names model_type `idefics3` (a Granite-165M Llama decoder behind a SigLIP2 encoder),
so this builds the `idefics3` classes. transformers' own `granite_docling` model type is a different, later
architecture (ibm-granite/granite-for-docling-500m: DeepStack mergers, a fine connector route, Granite multipliers)
that the 258M checkpoint does not load into.
Kept real: the config, model, image processor (its PIL variant, no torchvision) and processor classes; all 96 special
tokens of the real vocabulary (ids 100256-100351 there: role markers, DocTags, the 4x4 <row_r_col_c> grid,
<fake_token_around_image>, <image>, <global-img>) in their real order, then <end_of_utterance> (100352, added by
the processor); bos <|start_of_role|>, eos = pad = <|end_of_text|>, unk <|unk|>, no BOS added by the tokenizer, left
padding, 8192 context; the chat template verbatim; a Llama text model with tied embeddings; the pixel-shuffle
connector with the real scale_factor 4; image splitting ON (tiles of `max_image_size` plus one global view);
LANCZOS resize, 0.5/0.5 normalisation.
Shrunk: every width and depth, the vocabulary (a byte-level BPE trained offline), and the image: 32 px tiles of
4 px patches (an 8x8 grid, shuffled by 4 into 2x2 = 4 tokens per tile) and pages resized to a 64 px longest edge
(at most 2x2 tiles + the global view; the real 2048/512 allows 4x4, the most the row/col tokens name).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from finetune.models.auto.processor import image_only_class, save_hub_layout
from finetune.models.tiny_tokenizer import train_tiny_tokenizer

# Verbatim from the Hub repo's chat_template.jinja, read from the mirror pgadet-wq/granite-docling-258M (commit
# 587b823df5e5f63a4a9b4b2d2988632512c97cdb). The newline after <|end_of_text|> is a real newline in that file.
CHAT_TEMPLATE = """{%- for message in messages -%}
{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}
{{- part['text'] -}}
{%- elif part['type'] == 'image' -%}
{{- '<image>' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|end_of_text|>
' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_of_role|>assistant' -}}
{%- if controls -%}{{- ' ' + controls | tojson() -}}{%- endif -%}
{{- '<|end_of_role|>' -}}
{%- endif -%}
"""

_SECTIONS = [f"section_header_level_{i}" for i in range(1, 7)]
_PAIRED = ["caption", "footnote", "formula", "list_item", "page_footer", "page_header", "picture", *_SECTIONS]
_PAIRED += ["otsl", "checkbox_selected", "checkbox_unselected", "form", "key_value_region"]

# The real tokenizer's added tokens in their real order (tokenizer_config.json's added_tokens_decoder, ids
# 100256-100351), then <end_of_utterance> (added_tokens.json, 100352).
SPECIAL_TOKENS = [
    "<|pad|>",
    "<|end_of_text|>",
    "<row_1_col_1>",
    "<row_1_col_2>",
    "<text>",
    "<row_1_col_3>",
    "<row_1_col_4>",
    "<row_2_col_1>",
    "<|start_of_role|>",
    "<|end_of_role|>",
    "</title>",
    "<row_2_col_2>",
    "<row_2_col_3>",
    "<title>",
    "<image>",
    *[tag for name in _PAIRED for tag in (f"<{name}>", f"</{name}>")],
    "<key_",
    "</key_",
    "<value_",
    "</value_",
    "<link_",
    "<chart>",
    "</chart>",
    "<page_break>",
    "<smiles>",
    "</smiles>",
    "</text>",
    "<paragraph>",
    "</paragraph>",
    "<references>",
    "</references>",
    "<ordered_list>",
    "</ordered_list>",
    "<unordered_list>",
    "</unordered_list>",
    "<group>",
    "<doctag>",
    "</doctag>",
    "<rec_",
    "<fcel>",
    "<ecel>",
    "<lcel>",
    "<ucel>",
    "<xcel>",
    "<nl>",
    "<ched>",
    "<rhed>",
    "<|unk|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<row_2_col_4>",
    *[f"<row_{r}_col_{c}>" for r in (3, 4) for c in range(1, 5)],
    "<code>",
    "</code>",
    "<end_of_utterance>",
]
assert len(SPECIAL_TOKENS) == 100353 - 100256 and len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)

MAX_TILES_PER_SIDE = 4  # the real vocabulary names rows and columns 1-4 only

DEFAULT_SIZES = {
    "text_hidden": 64,
    "text_intermediate": 128,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "image_size": 32,  # a tile: the vision encoder's input and the image processor's max_image_size
    "patch_size": 4,
    "scale_factor": 4,  # the real pixel-shuffle factor
    "longest_edge": 64,  # pages are resized to this longest edge before splitting (2048 = 4 tiles in the real one)
}


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random granite-docling-258M look-alike to `out_dir`; `sizes` override DEFAULT_SIZES."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    s = DEFAULT_SIZES | sizes
    grid = s["image_size"] // s["patch_size"]
    if s["image_size"] % s["patch_size"] or grid % s["scale_factor"]:
        raise ValueError("patch_size must divide image_size, and scale_factor the patch grid")
    if s["longest_edge"] > MAX_TILES_PER_SIDE * s["image_size"]:
        raise ValueError(f"longest_edge may be at most {MAX_TILES_PER_SIDE} tiles (image_size) long")
    image_seq_len = (grid // s["scale_factor"]) ** 2
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tiny_tokenizer(
        SPECIAL_TOKENS,
        bos_token="<|start_of_role|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<|unk|>",
        extra_special_tokens=["<fake_token_around_image>", "<image>"],  # the real additional_special_tokens
        add_bos_token=False,
        padding_side="left",
        model_max_length=8192,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    bos, eos = ids["<|start_of_role|>"], ids["<|end_of_text|>"]

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["text_hidden"],
        intermediate_size=s["text_intermediate"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"],
        head_dim=s["text_hidden"] // s["text_heads"],
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
        pad_token_id=eos,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=s["vision_intermediate"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    config = Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=s["scale_factor"],
        image_token_id=ids["<image>"],
        pad_token_id=eos,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    # As the real generation_config.json: greedy, stop at <|end_of_text|>, which is also the pad.
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(out_dir)

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": s["longest_edge"]},
        max_image_size={"longest_edge": s["image_size"]},
        resample=PILImageResampling.LANCZOS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = image_only_class(Idefics3Processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_len=image_seq_len,
    )
    save_hub_layout(processor, out_dir)
    return out_dir
