"""Tiny, randomly initialised Ovis checkpoints in the exact original (AIDC-AI) Hub layout, built offline.

    ovis2     Qwen2 (tied head, as Ovis2-1B / 2B) + AIMv2, CLIP normalisation, QwenConversationFormatter
    ovis1.6   Gemma2 (tied head, soft-capping, sliding window) + SigLIP with its pooling head (stored, unused),
              mean = std = 0.5, GemmaConversationFormatter; its patch grid is odd (7 × 7, like SigLIP-384's 27 × 27),
              so hidden_stride 2 pads it to 8 × 8 as the real model pads 27 to 28.

config.json, bfloat16 model.safetensors in the original names (`visual_tokenizer.backbone.preprocessor.*`,
`trunk.blocks.*.attn.qkv` for AIMv2), preprocessor_config.json, generation_config.json and a byte-level tokenizer
whose special tokens are the real ones of each LLM. The remote-code files are not written (they are AIDC-AI's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.models.ovis.checkpoint import to_checkpoint
from finetune.models.ovis.config import CheckpointConfig
from finetune.models.ovis.modeling import OvisForConditionalGeneration
from finetune.models.tiny_tokenizer import save_tiny_tokenizer, train_tiny_tokenizer

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
VARIANTS = ("ovis2", "ovis1.6")
SPECIAL_TOKENS = {
    # Gemma's first ids are <pad> 0, <eos> 1, <bos> 2, <unk> 3; its turn markers are special tokens too.
    "ovis1.6": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    "ovis2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _tokenizer(variant: str, out_dir: Path, max_positions: int) -> dict[str, int]:
    specials = SPECIAL_TOKENS[variant]
    if variant == "ovis1.6":
        kwargs = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    else:  # Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>, no bos
        kwargs = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
    tokenizer = train_tiny_tokenizer(specials, model_max_length=max_positions, **kwargs)
    save_tiny_tokenizer(tokenizer, out_dir, add_bos_token=False, add_eos_token=False)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in specials} | {"__len__": len(tokenizer)}


def build_tiny_ovis(
    out_dir: str | Path,
    *,
    variant: str = "ovis2",
    image_size: int = 56,
    patch_size: int = 7,
    hidden_stride: int = 2,
    vision_hidden: int = 32,
    vision_intermediate: int | None = None,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_intermediate: int | None = None,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    visual_vocab_size: int = 64,
    vocab_size: int | None = None,
    llm_layer_std: float = 0.4,
    seed: int = 0,
) -> Path:
    """A tiny original-layout Ovis checkpoint (see the module docstring). Tokens per crop =
    ceil(image_size / patch_size / hidden_stride)²: 16 for both test presets.

    `text_intermediate` / `vision_intermediate`: the MLP widths (4 × the hidden size unless given).

    `llm_layer_std`: the LLM's layer matrices are drawn with this std (its embedding keeps transformers' 0.02). With
    a tied head, a tiny LLM initialised at 0.02 mostly echoes its input token, so every prompt continues with one
    token repeated; larger layer weights make its continuations depend on the input (what the generation checks
    need, as a real model's do)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_positions = 8192
    ids = _tokenizer(variant, out_dir, max_positions)
    vocab = max(vocab_size or 0, ids["__len__"])
    gemma = variant == "ovis1.6"
    common = {
        "vocab_size": vocab,
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate or text_hidden * 4,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    if gemma:
        llm_config = {
            **common,
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "head_dim": text_hidden // text_heads,
            "query_pre_attn_scalar": text_hidden // text_heads,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "sliding_window": 64,  # short, so the tests' sequences reach past it on the sliding layers
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "attention_bias": False,
            "cache_implementation": "hybrid",
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
            "pad_token_id": ids["<pad>"],
        }
        backbone = {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or vision_hidden * 4,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
        }
    else:
        llm_config = {
            **common,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": text_layers,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        }
        backbone = {
            "model_type": "aimv2",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or vision_hidden * 4,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch_size,
            "rms_norm_eps": 1e-05,
            "attention_dropout": 0.0,
            "projection_dropout": 0.0,
            "qkv_bias": False,
            "use_bias": False,
        }
    config = {
        "architectures": ["Ovis"],
        "auto_map": {"AutoConfig": "configuration_ovis.OvisConfig", "AutoModelForCausalLM": "modeling_ovis.Ovis"},
        "model_type": "ovis",
        "conversation_formatter_class": "GemmaConversationFormatter" if gemma else "QwenConversationFormatter",
        "disable_tie_weight": False,
        "hidden_size": text_hidden,
        "llm_attn_implementation": "eager" if gemma else None,
        "multimodal_max_length": 8192,
        "torch_dtype": "bfloat16",
        "llm_config": llm_config,
        "visual_tokenizer_config": {
            "model_type": "siglip_visual_tokenizer" if gemma else "aimv2_visual_tokenizer",
            "backbone_config": backbone,
            "vocab_size": visual_vocab_size,
            "hidden_stride": hidden_stride,
            "tokenize_function": "softmax",
            "tau": 1.0,
            "depths": None,
            "drop_cls_token": False,
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    preprocessor = {
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    if gemma:
        preprocessor |= {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": image_size, "width": image_size},
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
    else:
        preprocessor |= {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": False,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    end = ids["<end_of_turn>"] if gemma else ids["<|im_end|>"]
    eos = ids["<eos>"] if gemma else ids["<|endoftext|>"]
    generation = {"eos_token_id": [eos, end], "pad_token_id": ids["<pad>"] if gemma else ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    from finetune.models.ovis.config import read_checkpoint_config

    ckpt: CheckpointConfig = read_checkpoint_config(out_dir)
    # The placeholder ids do not matter for the weights; the processor adds its tokens after the vocabulary.
    native = ckpt.native(vocab, list(range(vocab + 1, vocab + 6)), vision_use_head=gemma)
    torch.manual_seed(seed)
    model = OvisForConditionalGeneration(native)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.ndim == 2 and "embed_tokens" not in name and name != "lm_head.weight":
                param.normal_(0.0, llm_layer_std)
        # Norm weights and biases start at 1 / 0, which a loader that misses them would also produce: moved off
        # those values, a misnamed norm changes the outputs (and the comparison with the original code shows it).
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn(param.shape) * 0.1)
    state = to_checkpoint(model.state_dict(), "original", ckpt.backbone, tied_head=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def write_hf_layout(original_dir: str | Path, out_dir: str | Path) -> Path:
    """The same Ovis2 weights in transformers' `-hf` layout (as `Ovis2ForConditionalGeneration` names them): config
    `model_type: ovis2` with text / vision sub-configs and the image and indicator token ids, the tokenizer with those
    tokens added, and an `Ovis2ImageProcessor`-style preprocessor_config.json."""
    from finetune.models.ovis.checkpoint import to_native
    from finetune.models.ovis.config import read_checkpoint_config
    from finetune.models.ovis.processor import OvisProcessor
    from finetune.models.weights import read_tensors, safetensors_files

    original_dir, out_dir = Path(original_dir), Path(out_dir)
    ckpt = read_checkpoint_config(original_dir)
    if ckpt.layout != "original" or ckpt.backbone != "aimv2":
        raise ValueError("only an original-layout Ovis2 (AIMv2) checkpoint has an -hf layout")
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = OvisProcessor.from_pretrained(str(original_dir))  # adds <image> and the indicator tokens
    processor.tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    native = to_native(read_tensors(safetensors_files(original_dir, "Ovis")), "original", "aimv2")
    state = to_checkpoint(native, "hf", tied_head=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    backbone = ckpt.vision
    text = {k: v for k, v in ckpt.text.items() if k not in ("architectures",)}
    config = {
        "architectures": ["Ovis2ForConditionalGeneration"],
        "model_type": "ovis2",
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "image_token_id": processor.image_token_id,
        "visual_indicator_token_ids": processor.indicator_ids,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "torch_dtype": "bfloat16",
        "text_config": text,
        "vision_config": {
            "model_type": "ovis2_vision",
            "hidden_size": backbone["hidden_size"],
            "intermediate_size": backbone["intermediate_size"],
            "num_hidden_layers": backbone["num_hidden_layers"],
            "num_attention_heads": backbone["num_attention_heads"],
            "num_channels": backbone.get("num_channels", 3),
            "image_size": backbone["image_size"],
            "patch_size": backbone["patch_size"],
            "rms_norm_eps": backbone.get("rms_norm_eps", 1e-5),
            "attention_dropout": 0.0,
            "qkv_bias": bool(backbone.get("qkv_bias", False)),
            "mlp_bias": bool(backbone.get("use_bias", False)),
            "hidden_act": "silu",
            "vocab_size": ckpt.visual_vocab_size,
            "hidden_stride": ckpt.hidden_stride,
            "num_visual_indicator_tokens": 5,
            "tokenize_function": ckpt.tokenize_function,
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    s = processor.settings
    preprocessor = {
        "image_processor_type": "Ovis2ImageProcessor",
        "size": {"height": s.side, "width": s.side},
        "image_mean": s.image_mean,
        "image_std": s.image_std,
        "rescale_factor": s.rescale_factor,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out_dir / "generation_config.json").write_bytes((original_dir / "generation_config.json").read_bytes())
    return out_dir
