"""Tiny random Gemma 3 in the layout of google/gemma-3-4b-it (Gemma3ForConditionalGeneration).

Kept real: the config, model, image processor (its PIL variant, no torchvision) and processor classes; the special
tokens in their real order; `<bos>` added by the tokenizer and also written by the chat template (as in the real
repo); the chat template verbatim; eos = [<eos>, <end_of_turn>]; the 5:1 local/global attention pattern (here 1:1
for 2 layers, the last layer global), linear RoPE scaling on the global layers, query_pre_attn_scalar = head_dim,
no softcapping, tied embeddings; SigLIP without head, 0.5/0.5 normalisation, bilinear resize, pan-and-scan off;
the image pooled to a square `mm_tokens_per_image` and wrapped as "\\n\\n<start_of_image>…<end_of_image>\\n\\n".
Shrunk: every width and depth, the vocabulary (a byte-level BPE trained offline), the image (32 px, patch 8 -> a 4x4
grid pooled to 2x2 = 4 tokens) and the sliding window (so that short test prompts cross it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from finetune.models.auto.processor import image_only_class, save_hub_layout
from finetune.models.tiny_tokenizer import train_tiny_tokenizer

# Verbatim from transformers' src/transformers/models/gemma3/convert_gemma3_weights.py (`_CHAT_TEMPLATE`), the
# script that wrote the Hub repo's chat_template.json; identical to the template in google/gemma-3-4b-it.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# The real vocabulary's special pieces in their real order (ids 0-5, 106, 107, 255999, 256000, 262144 there).
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

DEFAULT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 32,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 128,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "mm_tokens_per_image": 4,
}


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random google/gemma-3-4b-it look-alike to `out_dir`; `sizes` override DEFAULT_SIZES."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    s = DEFAULT_SIZES | sizes
    grid = s["image_size"] // s["patch_size"]
    side = round(s["mm_tokens_per_image"] ** 0.5)
    if side * side != s["mm_tokens_per_image"] or grid % side:
        raise ValueError("mm_tokens_per_image must be a square whose side divides image_size // patch_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tiny_tokenizer(
        SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,  # as the real GemmaTokenizer; the chat template writes <bos> too
        add_eos_token=False,
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        model_max_length=131072,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = [ids["<eos>"], ids["<end_of_turn>"]]  # the -it checkpoint stops on either

    layers = s["num_hidden_layers"]
    # The real pattern is 5 sliding layers then 1 global; with few layers keep the same alternation but make sure
    # the last layer is global, so both kinds exist.
    pattern = min(6, layers)
    layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        query_pre_attn_scalar=s["head_dim"],  # 256 = head_dim in the 4b
        sliding_window=s["sliding_window"],
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        tie_word_embeddings=True,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=s["vision_hidden_size"],
        intermediate_size=s["vision_intermediate_size"],
        num_hidden_layers=s["vision_num_hidden_layers"],
        num_attention_heads=s["vision_num_attention_heads"],
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=s["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the image projection to zeros, which would make a random model blind to its images
    # (same logits whatever the picture); the real one is trained, so give it random weights like the rest.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    # The real generation_config.json (sampling defaults of the -it model).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=eos,
        pad_token_id=ids["<pad>"],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    model.save_pretrained(out_dir)

    image_processor = Gemma3ImageProcessorPil(
        size={"height": s["image_size"], "width": s["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BILINEAR,
        do_pan_and_scan=False,
    )
    processor = image_only_class(Gemma3Processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=s["mm_tokens_per_image"],
    )
    save_hub_layout(processor, out_dir)
    return out_dir
