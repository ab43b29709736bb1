"""Tiny random Qwen3-VL in the file layout of the Hub repo Qwen/Qwen3-VL-2B-Instruct.

Kept real: the model and config classes, the structure (16-pixel patches, 2x2 spatial merge, 2-frame temporal
patches, learned vision position embeddings, DeepStack features from vision blocks spread over the depth as in the
real [5, 11, 17] of 24, interleaved M-RoPE with sections in the real proportions, explicit head_dim, tied word
embeddings as in the 2B), the special tokens with their names, the eos/pad tokens, the chat template verbatim, the
image processor class with Qwen3-VL's 0.5/0.5 normalisation, and the file names.
Shrunk: widths and depths (text 64 wide x 2 layers, vision 32 wide x 2 blocks), the vocabulary (a tiny byte-level
BPE), the position-embedding grid, and the pixel budget (4..64 merged patches per image).
"""

from __future__ import annotations

from pathlib import Path

from finetune.models.auto.tiny.qwen2_5_vl import SPECIAL_TOKENS as QWEN2_5_VL_SPECIAL_TOKENS
from finetune.models.auto.tiny.qwen2_5_vl import finish_tokenizer_files, qwen_tokenizer

# Qwen/Qwen3-VL-2B-Instruct chat_template.json, verbatim (the Instruct template: tools, tool responses with images,
# no <think> handling; that is in the Thinking checkpoints' template). Read from the QWEN3VL_INSTRUCT_CHAT_TEMPLATE
# constant of an NVIDIA TAO cosmos-rl dataset module (found with the code search; the file states it is
# byte-identical to the template of Qwen/Qwen3-VL-8B-Instruct, which the 2B shares) and checked against an
# independent copy in a C++ test (caiwei text_tool test_chat_template).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (data, kept verbatim)

# The real added tokens: Qwen2.5-VL's, then the tool-response and thinking markers Qwen3 added.
SPECIAL_TOKENS = [*QWEN2_5_VL_SPECIAL_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>"]
# The real tokenizer_config's additional_special_tokens (everything from <|im_start|> to <|video_pad|>).
EXTRA_SPECIAL_TOKENS = SPECIAL_TOKENS[1:14]

PATCH_SIZE = 16
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
    "vision_intermediate": 128,
    # A square grid (16 x 16 patches here, 48 x 48 in the real model) that is interpolated to each image's grid.
    "vision_position_embeddings": 256,
    # In merged patches (one image token each); 64 is also the real minimum (shortest_edge 65536 = 64 * 32 * 32).
    "min_tokens": 4,
    "max_tokens": 64,
}


def _mrope_section(head_dim: int) -> list[int]:
    """The real [24, 20, 20] (temporal, height, width; of head_dim/2 = 64 rotary frequencies) scaled to head_dim."""
    half = head_dim // 2
    spatial = round(half * 20 / 64)
    return [half - 2 * spatial, spatial, spatial]


def _deepstack_indexes(depth: int) -> list[int]:
    """The real model feeds the outputs of blocks [5, 11, 17] of 24 (the end of each of the first three quarters)
    to the first text layers; the same quarters at any depth, at least one block."""
    return sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3)})


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write the tiny checkpoint to `out_dir` and return it. `sizes` overrides `DEFAULT_SIZES` (plus `min_pixels` /
    `max_pixels` directly, which win over `min_tokens` / `max_tokens`)."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
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
    tokenizer = qwen_tokenizer(out_dir, SPECIAL_TOKENS, EXTRA_SPECIAL_TOKENS, model_max_length=262144)
    ids = tokenizer.convert_tokens_to_ids

    # Qwen3-VL has no image processor of its own: the real preprocessor_config.json names Qwen2-VL's, with 16-pixel
    # patches and mean = std = 0.5.
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    head_dim = s["text_hidden"] // s["text_heads"]
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": s["text_hidden"],
            "intermediate_size": s["text_intermediate"],
            "num_hidden_layers": s["text_layers"],
            "num_attention_heads": s["text_heads"],
            "num_key_value_heads": s["text_kv_heads"],
            "head_dim": head_dim,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": _mrope_section(head_dim),
                "mrope_interleaved": True,
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": s["vision_layers"],
            "hidden_size": s["vision_hidden"],
            "intermediate_size": s["vision_intermediate"],
            "num_heads": s["vision_heads"],
            "hidden_act": "gelu_pytorch_tanh",
            "out_hidden_size": s["text_hidden"],
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "num_position_embeddings": s["vision_position_embeddings"],
            "deepstack_visual_indexes": _deepstack_indexes(s["vision_layers"]),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,  # as in the 2B and 4B (the 8B and larger are untied)
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    # The real generation_config.json, with the tiny tokenizer's ids.
    model.generation_config = GenerationConfig(
        bos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        do_sample=True,
        repetition_penalty=1.0,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    model.save_pretrained(out_dir)
    save_hub_layout(processor, out_dir)
    finish_tokenizer_files(out_dir, "Qwen3VLProcessor", CHAT_TEMPLATE)
    return out_dir
