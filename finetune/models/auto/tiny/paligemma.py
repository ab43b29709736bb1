"""Tiny random PaliGemma 2 in the layout of google/paligemma2-3b-pt-224 (PaliGemmaForConditionalGeneration).

Kept real: the config, model, image processor (SigLIP's PIL variant, no torchvision) and processor classes; a Gemma 2
text model with its softcapping (attention 50, logits 30), query_pre_attn_scalar = head_dim, alternating
sliding/global layers and tied embeddings; SigLIP without head, 0.5/0.5 normalisation, bicubic resize to a square;
the special tokens in their real order with `<image>` as the image token, and the <loc>/<seg> tokens the processor
adds; the tokenizer adds `<bos>` (the processor switches that off and writes "<image>…<bos>prefix\\n" itself, then
"suffix<eos>" for training); no chat template, as the pt checkpoints have none.
Shrunk: every width and depth, the vocabulary (a byte-level BPE trained offline), the image (32 px, patch 8 -> 16
image tokens, every patch one token as in the real model) and the sliding window (so that short prompts cross it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    GenerationConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from finetune.models.auto.processor import image_only_class, save_hub_layout
from finetune.models.tiny_tokenizer import train_tiny_tokenizer

# The real vocabulary's special pieces in their real order (ids 0-5, 106, 107 and 257152 there); the 1024 <locNNNN>
# and 128 <segNNN> tokens (ids 256000-257151 there) are appended by PaliGemmaProcessor itself.
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
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
}


def build(out_dir: Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random google/paligemma2-3b-pt-224 look-alike to `out_dir`; `sizes` override DEFAULT_SIZES."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes: {sorted(unknown)}")
    s = DEFAULT_SIZES | sizes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_seq_length = (s["image_size"] // s["patch_size"]) ** 2

    tokenizer = train_tiny_tokenizer(
        SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,  # as the real GemmaTokenizer; PaliGemmaProcessor turns it off and places <bos> itself
        add_eos_token=False,
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": s["image_size"], "width": s["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC,
        image_seq_length=image_seq_length,  # PaliGemmaProcessor reads the image token count from here
    )
    # Built before the model: the processor appends the <loc>/<seg> tokens, which the vocabulary must cover.
    processor = image_only_class(PaliGemmaProcessor)(image_processor=image_processor, tokenizer=tokenizer)
    # Save the tokenizer as the real one is (adding <bos>); loading it through the processor turns that off again.
    tokenizer.add_bos_token = True
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    layers = s["num_hidden_layers"]
    text_config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"],
        query_pre_attn_scalar=s["head_dim"],  # 256 = head_dim in the 3b
        sliding_window=s["sliding_window"],
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
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
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=ids["<image>"],
        vocab_size=vocab_size,
        projection_dim=s["hidden_size"],
        hidden_size=s["hidden_size"],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=True,
    )
    config.architectures = ["PaliGemmaForConditionalGeneration"]

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    # The real generation_config.json: greedy, stop on <eos>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"]
    )
    model.save_pretrained(out_dir)
    save_hub_layout(processor, out_dir)
    return out_dir
