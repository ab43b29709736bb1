"""Tiny, randomly initialised H2OVL-Mississippi checkpoints in the exact original Hub layout, built offline.

Used by the tests and the quickstart: `load_h2ovl` reads them through the same code as the real checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import InternVLForConditionalGeneration

from finetune.models.mississippi.checkpoint import native_to_original
from finetune.models.mississippi.config import ARCHITECTURE, MODEL_TYPE, native_config
from finetune.models.mississippi.image import IMG_CONTEXT
from finetune.models.mississippi.processor import H2OGPT2_CHAT_TEMPLATE
from finetune.models.tiny_tokenizer import save_tiny_tokenizer, train_tiny_tokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|prompt|>", "<|answer|>", "<|end|>", "<img>", "</img>", IMG_CONTEXT]


def build_tiny_h2ovl(
    out_dir: str | Path,
    *,
    llm: str = "llama",
    use_msac: bool = False,
    image_size: int = 56,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_heads: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    extra_corpus: Iterable[str] = (),
) -> Path:
    """A tiny randomly initialised checkpoint in the original H2OVL Hub layout (config.json, bfloat16
    model.safetensors in original names, generation_config.json, tokenizer.json + tokenizer_config.json).

    `llm="llama"` is shaped like mississippi-800m (LlamaForCausalLM, rope_theta 1e5), `"mistral"` like
    mississippi-2b (MistralForCausalLM, rope_theta 1e4). Widths, depths and heads are free, so benchmarks can
    build real shapes; `vocab_size` pads the embedding and LM head beyond the tiny tokenizer (a real tokenizer's
    32k rows are a real share of the LLM's compute). Tokens per tile = (image_size / patch_size)² · 0.5²
    (56 px, patch 14 → 16 patches → 4 tokens). Tokenizer: byte-level BPE with ids 0..8 = SPECIAL_TOKENS; BOS `<s>`
    (never added automatically), EOS `</s>`, pad = `<unk>` (Llama-family convention, no extra token); class name
    `PreTrainedTokenizerFast`, which transformers 4 and 5 both load without remote code (a `LlamaTokenizer` name
    over a byte-level tokenizer.json makes transformers 5 warn and fall back).
    """

    if llm not in ("llama", "mistral"):
        raise ValueError(f"llm must be 'llama' or 'mistral', not {llm!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_positions = 8192
    tokenizer = train_tiny_tokenizer(
        SPECIAL_TOKENS,
        extra_corpus=list(extra_corpus),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        model_max_length=max_positions,
    )
    save_tiny_tokenizer(
        tokenizer, out_dir, add_bos_token=False, add_eos_token=False, chat_template=H2OGPT2_CHAT_TEMPLATE
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    mistral = llm == "mistral"
    llm_config = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": llm,
        "vocab_size": max(vocab_size or 0, len(tokenizer)),
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate or text_hidden * 4,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rope_theta": 10000.0 if mistral else 100000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-05,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<unk>"],
        "torch_dtype": "bfloat16",
        **({"sliding_window": None} if mistral else {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
    }
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 4,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-06,
        "qkv_bias": True,
        "qk_normalization": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.1,
        "initializer_factor": 0.1,
        "initializer_range": 0.02,
        "use_flash_attn": True,
        "torch_dtype": "bfloat16",
    }
    # The 800m repo spells its remote code file `modelling_h2ovl_chat.py`, the 2b repo `modeling_h2ovl_chat.py`.
    modeling = "modeling_h2ovl_chat" if mistral else "modelling_h2ovl_chat"
    config = {
        "architectures": [ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_h2ovl_chat.H2OVLChatConfig",
            "AutoModel": f"{modeling}.H2OVLChatModel",
            "AutoModelForCausalLM": f"{modeling}.H2OVLChatModel",
        },
        "model_type": MODEL_TYPE,
        "template": "h2ogpt2",
        "force_image_size": image_size,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "use_msac": bool(use_msac),
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "bfloat16",
        "llm_config": llm_config,
        "vision_config": vision_config,
    }
    native = native_config(config, ids[IMG_CONTEXT])
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native)
    state = {
        k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in native_to_original(model.state_dict()).items()
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": ids["<s>"],
        "eos_token_id": [ids["</s>"], ids["<|end|>"]],
        "pad_token_id": ids["<unk>"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir
