"""Tiny random InternVL3 in the file layout of the Hub repo OpenGVLab/InternVL3-1B-hf (the transformers-native
conversion: InternVLForConditionalGeneration, model_type `internvl`, a Qwen2 text model).

Kept real: the model and config classes, the structure (InternViT with a CLS token, absolute position embeddings,
qkv bias, layer scale and mean pooling; pixel-shuffle downsample_ratio 0.5 so each tile's patch grid becomes a
quarter as many tokens; the LayerNorm-Linear-GELU-Linear projector; Qwen2 with 2 kv-head GQA and dynamic-NTK rope
scaling factor 2; untied lm_head), the tokenizer's added tokens in their real order with the real eos/pad and the
named image tokens the processor reads, the chat template verbatim, the image processor family (GotOcr2 tiling:
a grid of tiles plus a thumbnail) and normalisation, and the file names (config.json, generation_config.json,
model.safetensors, tokenizer files, preprocessor_config.json, processor_config.json, chat_template.json).
Shrunk: widths and depths (text 64 wide x 2 layers, vision 32 wide x 2 blocks), the vocabulary (a tiny byte-level
BPE), and the tiles (32 px with 8 px patches, so 4 tokens a tile, at most 4 tiles + thumbnail a picture).
"""

from __future__ import annotations

from pathlib import Path

# OpenGVLab/InternVL3-1B-hf chat_template.json, verbatim: the `chat_template` constant of transformers'
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py (the script that wrote the -hf repos), in its
# later form where an image becomes <IMG_CONTEXT> (the token InternVLProcessor expands) rather than <image>;
# checked against an independent copy in a third-party InternVL -> -hf conversion script.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# The added tokens of the real tokenizer (Qwen2.5-VL's, then InternVL's own), in their real order: ids 151643..151673
# there, 0..30 here.
QWEN_TOKENS = [
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
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SPECIAL_TOKENS = QWEN_TOKENS + INTERNVL_TOKENS
# The real additional special tokens: Qwen2.5-VL's (<|im_start|> .. <|video_pad|>) plus all of InternVL's.
EXTRA_SPECIAL_TOKENS = QWEN_TOKENS[1:14] + INTERNVL_TOKENS
# The named tokens InternVLProcessor reads off the tokenizer. <video> is not in the real vocabulary; transformers 5
# adds it as one more special token when the tokenizer loads (here: the last id).
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

DOWNSAMPLE_RATIO = 0.5  # real: pixel shuffle halves each side of the patch grid

DEFAULT_SIZES = {
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 128,
    "vision_hidden": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "vision_intermediate": 128,  # 4x hidden, as the real 1024 -> 4096
    "image_size": 32,  # one tile's side (real: 448)
    "patch_size": 8,  # real: 14; 32/8 = 4x4 patches -> 2x2 = 4 tokens per tile after the pixel shuffle
    "max_patches": 4,  # tiles per picture before the thumbnail (real: 12)
}


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write the tiny checkpoint to `out_dir` and return it. `sizes` overrides `DEFAULT_SIZES`."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    from finetune.models.auto.processor import image_only_class, save_hub_layout
    from finetune.models.auto.tiny.qwen2_5_vl import _patch_json, finish_tokenizer_files
    from finetune.models.tiny_tokenizer import train_tiny_tokenizer

    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    s = {**DEFAULT_SIZES, **sizes}
    grid = s["image_size"] // s["patch_size"]
    image_seq_length = int(grid * grid * DOWNSAMPLE_RATIO**2)
    if grid * DOWNSAMPLE_RATIO != int(grid * DOWNSAMPLE_RATIO) or image_seq_length < 1:
        raise ValueError("image_size / patch_size must be even: the pixel shuffle halves the patch grid")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Train with the tiny trainer, then reload under the real class (Qwen2Tokenizer rebuilds the backend from the
    # vocab and merges with Qwen's own pre-tokenizer and normaliser), so the saved files are what it writes and reads.
    tiny = train_tiny_tokenizer(
        SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        model_specific_special_tokens=NAMED_TOKENS,
        model_max_length=8192,  # the conversion script's CONTEXT_LENGTH
    )
    tiny.save_pretrained(out_dir)
    _patch_json(out_dir / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer", backend=None)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer.convert_tokens_to_ids
    assert ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS))), "special tokens moved when reloaded"
    assert tokenizer.context_image_token_id == ids("<IMG_CONTEXT>"), "named image tokens lost when reloaded"

    # GotOcr2 tiling as InternVL3 uses it: the picture is resized onto the best grid of at most `max_patches`
    # tiles, plus a thumbnail of the whole picture whenever there is more than one tile. Tiling is switched on
    # in the image processor itself (the real one leaves it to InternVLProcessor's default), so every path agrees.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": s["image_size"], "width": s["image_size"]},
        crop_to_patches=True,
        min_patches=1,
        max_patches=s["max_patches"],
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    processor = image_only_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=image_seq_length,
    )

    config = InternVLConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "max_window_layers": 70,
            "use_sliding_window": False,
            "sliding_window": None,
            "rms_norm_eps": 1e-6,
            # InternVL3-1B's llm_config: dynamic-NTK scaling by 2 over Qwen2.5's rope_theta 1e6.
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),  # the conversion forces <|im_end|> for InternVL3
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": s["vision_hidden"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "intermediate_size": s["vision_intermediate"],
            "image_size": [s["image_size"], s["image_size"]],
            "patch_size": [s["patch_size"], s["patch_size"]],
            "hidden_act": "gelu",
            "attention_bias": True,  # InternViT's qkv_bias
            "use_qk_norm": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "layer_scale_init_value": 0.1,
            "use_absolute_position_embeddings": True,
            "use_mean_pooling": True,
        },
        image_token_id=ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,  # InternVL3-1B keeps a separate lm_head
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    # What the -hf repo's generation_config.json holds (derived from the text config), with the tiny ids.
    model.generation_config = GenerationConfig(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
    model.save_pretrained(out_dir)
    save_hub_layout(processor, out_dir)
    # vocab.json + merges.txt beside tokenizer.json, and a tokenizer_config.json naming the stock processor class
    # and carrying the chat template, as on the Hub.
    finish_tokenizer_files(out_dir, "InternVLProcessor", CHAT_TEMPLATE)
    return out_dir
