"""Tiny random Qwen2.5-VL in the file layout of the Hub repo Qwen/Qwen2.5-VL-3B-Instruct.

Kept real: the model and config classes, the structure (14-pixel patches, 2x2 spatial merge, 2-frame temporal
patches, windowed vision attention with the last block full, M-RoPE sections in the real proportions, tied word
embeddings as in the 3B checkpoint), the special tokens with their names, the eos/pad tokens, the chat template
verbatim, the image processor class and normalisation, and the file names (config.json, generation_config.json,
model.safetensors, tokenizer files, preprocessor_config.json, chat_template.json).
Shrunk: widths and depths (text 64 wide x 2 layers, vision 32 wide x 2 blocks), the vocabulary (a tiny byte-level
BPE), and the pixel budget (4..64 merged patches per image), so a whole page costs a few dozen tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen/Qwen2.5-VL-3B-Instruct chat_template.json (the same template as Qwen2-VL's), verbatim. Read from
# prepare_processor_dict in an older huggingface/transformers tests/models/qwen2_vl/test_processing_qwen2_vl.py and
# checked character for character against an independent copy labelled as the Qwen2.5-VL template in a user's
# data collator (both found with the code search).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# The added tokens of the real tokenizer, in their real order (ids 151643.. there, 0.. here).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# The real tokenizer_config's additional_special_tokens (everything from <|im_start|> to <|video_pad|>).
EXTRA_SPECIAL_TOKENS = SPECIAL_TOKENS[1:14]

PATCH_SIZE = 14
MERGE_SIZE = 2

DEFAULT_SIZES = {
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 128,
    "vision_hidden": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "vision_intermediate": 64,
    # In merged patches (one image token each): 4 is the real min_pixels (56*56); 64 keeps a page to a few dozen.
    "min_tokens": 4,
    "max_tokens": 64,
}


def _mrope_section(head_dim: int) -> list[int]:
    """The real [16, 24, 24] (temporal, height, width; of head_dim/2 = 64 rotary frequencies) scaled to head_dim."""
    half = head_dim // 2
    temporal = max(1, round(half * 16 / 64))
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _full_attention_blocks(depth: int) -> list[int]:
    """The real model makes every 8th of its 32 blocks full attention ([7, 15, 23, 31]), the others windowed; keep
    that shape at any depth: the last block of each quarter is full, and at least one block stays windowed."""
    step = max(2, depth // 4)
    return [i - 1 for i in range(step, depth + 1, step)]


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write the tiny checkpoint to `out_dir` and return it. `sizes` overrides `DEFAULT_SIZES` (plus `min_pixels` /
    `max_pixels` directly, which win over `min_tokens` / `max_tokens`)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from finetune.models.auto.processor import image_only_class, save_hub_layout

    unknown = set(sizes) - set(DEFAULT_SIZES) - {"min_pixels", "max_pixels"}
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    s = {**DEFAULT_SIZES, **sizes}
    unit = (PATCH_SIZE * MERGE_SIZE) ** 2  # pixels per image token
    min_pixels = s.get("min_pixels") or s["min_tokens"] * unit
    max_pixels = s.get("max_pixels") or s["max_tokens"] * unit

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = qwen_tokenizer(out_dir, SPECIAL_TOKENS, EXTRA_SPECIAL_TOKENS, model_max_length=131072)
    ids = tokenizer.convert_tokens_to_ids
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
    )
    processor = image_only_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    head_dim = s["text_hidden"] // s["text_heads"]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "max_window_layers": s["text_layers"],
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "sliding_window": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": _mrope_section(head_dim),
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": s["vision_layers"],
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_heads": s["vision_heads"],
            "hidden_act": "silu",
            "out_hidden_size": s["text_hidden"],
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": _full_attention_blocks(s["vision_layers"]),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,  # as in the 3B (the 7B and 72B are untied)
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # The real generation_config.json, with the tiny tokenizer's ids.
    model.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        do_sample=True,
        repetition_penalty=1.05,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
    )
    model.save_pretrained(out_dir)
    save_hub_layout(processor, out_dir)
    finish_tokenizer_files(out_dir, "Qwen2_5_VLProcessor", CHAT_TEMPLATE)
    return out_dir


def qwen_tokenizer(out_dir: Path, special_tokens: list[str], extra_special_tokens: list[str], *, model_max_length: int):
    """A tiny tokenizer with Qwen's special tokens, as the real class `Qwen2Tokenizer` (shared with Qwen3-VL).

    Trained by the tiny trainer, saved, then reloaded under `Qwen2Tokenizer`, which rebuilds the backend from the
    vocab and merges with Qwen's own pre-tokenizer (digits one by one) and NFC normaliser: what the real files load
    as, so the files saved later are the ones the real class writes and reads.
    """
    from transformers import AutoTokenizer

    from finetune.models.tiny_tokenizer import train_tiny_tokenizer

    tiny = train_tiny_tokenizer(
        special_tokens,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_special_tokens,
        model_max_length=model_max_length,
    )
    tiny.save_pretrained(out_dir)
    _patch_json(out_dir / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer", backend=None)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer.convert_tokens_to_ids(special_tokens) != list(range(len(special_tokens))):
        raise RuntimeError("the special tokens moved when the tokenizer was reloaded as Qwen2Tokenizer")
    return tokenizer


def finish_tokenizer_files(out_dir: Path, processor_class: str, chat_template: str) -> None:
    """Make the tokenizer files look like the Hub's: vocab.json and merges.txt beside tokenizer.json (what the
    slow tokenizer of transformers 4 reads), and a tokenizer_config.json that names the stock processor (not the
    image-only subclass) and also carries the chat template, as the real one does."""
    tokenizer_json = json.loads((out_dir / "tokenizer.json").read_text())
    bpe = tokenizer_json["model"]
    (out_dir / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    _patch_json(
        out_dir / "tokenizer_config.json",
        tokenizer_class="Qwen2Tokenizer",
        processor_class=processor_class,
        chat_template=chat_template,
        backend=None,
        is_local=None,
        local_files_only=None,
    )


def _patch_json(path: Path, **updates) -> None:
    """Update a JSON file's top-level keys; a value of None removes the key."""
    data = json.loads(path.read_text())
    for key, value in updates.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
