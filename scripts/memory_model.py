"""Peak GPU memory of fine-tuning, estimated (not measured) from the benchmark's model shapes.

    python scripts/memory_model.py [--fp32-base] [--json]

For each family (the real shapes of scripts/bench_common.py, plus Ovis1.6-Gemma2-9B defined here) and setting (LoRA
on a bf16 base, QLoRA on a 4-bit base, full fine-tuning in bf16), all with gradient checkpointing: the peak at batch
1 on a typical A4 page, and the largest batch that fits in 24 GiB and 80 GiB cards with 10% left for the CUDA context
and the allocator's fragmentation. `--fp32-base`: the frozen / unquantised weights in fp32, as our runner loads them
today (fp32 weights under bf16 autocast: LoRA's base costs twice as much, full fine-tuning keeps fp32 weights and
gradients). `--json`: the same figures on stdout, machine-readable.

Parameters are counted from the shapes by formula (every matrix and embedding; norms and biases too): the checkpoint
builders write a random-init checkpoint to disk, too slow to call here. The formulas agree with the transformers
classes built on the meta device to 0.01% (nn.Linear weights exactly). Memory, in bytes:
- weights: 2 per parameter (bf16). QLoRA: every nn.Linear but the LM head in NF4 with double quantisation, 0.5 +
  0.127/8 per parameter (finetune/models/quantization.py; its default `skip` is empty, so the vision tower's and the
  projector's linears are quantised too); embeddings, norms, patch convolutions and biases stay bf16.
- LoRA (r 16 on the LLM's q, k, v, o, gate, up, down; the recipes' default): r · (in + out) parameters per adapted
  matrix, fp32, with an fp32 gradient and AdamW's two fp32 moments: 16 per parameter.
- full fine-tuning: bf16 weights and gradients and two fp32 moments, 12 per parameter (16 with --fp32-base).
- activations, per token and decoder layer, bf16, SDPA's fused kernel (no tokens² term), no attention dropout:
  two RMSNorms keep an fp32 copy and the normed bf16 input of the next matmul (2 · 6h); attention keeps q, k, v after
  RoPE, the kernel's output and o_proj's input (6q + 4kv, q and kv the query and key/value widths); the gated MLP
  keeps gate, act(gate), up and their product (8I; 4I for a plain GELU MLP). That is 12h + 6q + 4kv + 8I, the
  Llama-style counterpart of Korthikanti et al.'s 34h for GPT. LoRA's dropout (0.05) adds a dropped copy and a
  mask of each adapted input, 3 bytes per element: 15h + 3q + 3I. Eager attention (Gemma2, which runs nothing else)
  adds 8 · heads · tokens (fp32 softmax, bf16 probabilities, soft-capped scores).
- with checkpointing a layer keeps only its input (2h, 4h with --fp32-base), and the backward recomputes one layer
  at a time: that layer's activations and their gradients (2 × the line above) come on top.
- logits at every text position (the runner computes them only where a label follows: an upper bound), bf16 plus
  the loss's fp32 log-probabilities and their gradient: 10 bytes per vocabulary row. Ovis's visual head (a softmax
  over its visual vocabulary V for every visual token): about 12V bytes per visual token kept when it trains, and as
  a transient of the vision forward when it is frozen (a frozen tower keeps nothing: nothing upstream needs a
  gradient), which then counts only if larger than the training activations.
Not counted: CUDA context (~0.5 GiB, outside torch.cuda.max_memory_allocated), the allocator's cached blocks,
dataloader pinned memory, temporary buffers of the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, markdown_table

GIB = 2**30
HEADROOM = 0.9  # of a card's memory usable by tensors: CUDA context and fragmentation take the rest
CARDS_GIB = (24, 80)
LORA_RANK = 16
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax scales (quantization.py's figure)
TEXT_TOKENS = 300  # instruction + JSON answer of a typical invoice

# Ovis1.6-Gemma2-9B is not a benchmark shape (no CPU or single-GPU benchmark trains it): its sizes live here. Gemma2-9B:
# 3584 wide, 42 layers, 16 heads of 256 (queries 4096 wide), 8 KV heads, GeGLU 14336, 256,000 rows, tied; SigLIP-so400m
# at 384 px: 1152 wide, 27 layers, MLP 4304, patch 14 (27 × 27 patches, padded to 28 × 28 by hidden_stride 2).
OVIS16_GEMMA2_9B = {
    "family": "ovis",
    "variant": "ovis1.6",
    "image_size": 384,
    "patch_size": 14,
    "vision_hidden": 1152,
    "vision_layers": 27,
    "vision_intermediate": 4304,
    "text_hidden": 3584,
    "text_layers": 42,
    "text_heads": 16,
    "text_kv_heads": 8,
    "text_head_dim": 256,
    "text_intermediate": 14336,
    "visual_vocab_size": 65536,  # as Ovis1.6's visual tokenizer (unconfirmed)
    "vocab_size": 256000,
}
# An A4 page (any of 150-300 dpi) as our tiling code cuts it: Mississippi 2 × 3 tiles + thumbnail (count_tiles),
# 13 tiles with MSAC (mississippi-2b); Ovis a 3 × 3 grid + the whole page (best_grid, num_crops), 256 tokens per
# AIMv2 crop, 196 per SigLIP crop, plus 11 indicator tokens around the crops.
FAMILIES = {
    "Mississippi-0.8B": (MODELS["0.8b"], {"tiles": 7, "tokens_per_tile": 256, "extra_text": 0}),
    "Mississippi-2B": (MODELS["2b"], {"tiles": 13, "tokens_per_tile": 256, "extra_text": 0}),
    "Ovis2-1B": (MODELS["ovis2-1b"], {"tiles": 10, "tokens_per_tile": 256, "extra_text": 11}),
    "Ovis1.6-Gemma2-9B": (OVIS16_GEMMA2_9B, {"tiles": 10, "tokens_per_tile": 196, "extra_text": 11}),
}
SETTINGS = ("LoRA bf16", "QLoRA 4-bit", "full bf16")


def parameters(shape: dict) -> dict[str, float]:
    """Parameter counts: `linear` (nn.Linear weights, what 4-bit quantises), `other` (embeddings, norms, biases,
    convolutions, the LM head), `lora` (the adapters r 16 adds)."""
    # Traits of the architecture, read from the shape: a visual vocabulary means a visual tokenizer and head.
    ovis, gemma = "visual_vocab_size" in shape, shape.get("variant") == "ovis1.6"
    hv, layers_v, patch = shape["vision_hidden"], shape["vision_layers"], shape["patch_size"]
    iv = shape.get("vision_intermediate", 4 * hv)
    patches = (shape["image_size"] // patch) ** 2
    # Vision tower: attention (4 h²), MLP (SwiGLU 3 h·I for AIMv2, two matrices otherwise), norms, biases.
    gated_vision = ovis and not gemma
    linear = layers_v * (4 * hv * hv + (3 if gated_vision else 2) * hv * iv)
    biases = 0 if gated_vision else layers_v * (4 * hv + iv + hv)
    other = biases + layers_v * 4 * hv + 3 * patch * patch * hv + (patches + 1) * hv
    if gemma:  # SigLIP's attention-pooling head, stored in the checkpoint, unused (its fused in_proj is no nn.Linear)
        linear += hv * hv + 2 * hv * iv
        other += 3 * hv * hv
    h, layers, vocab = shape["text_hidden"], shape["text_layers"], shape["vocab_size"]
    head_dim = shape.get("text_head_dim", h // shape["text_heads"])
    q, kv, inter = shape["text_heads"] * head_dim, shape["text_kv_heads"] * head_dim, shape["text_intermediate"]
    # Projector: Mississippi's LayerNorm + two linears from the 2 × 2-shuffled patches; Ovis's visual head (a linear
    # from the 2 × 2-merged patches to its visual vocabulary, then LayerNorm) and visual embedding table.
    if ovis:
        visual_vocab = shape["visual_vocab_size"]
        linear += 4 * hv * (visual_vocab - 5)
        other += 2 * (visual_vocab - 5) + visual_vocab * h
    else:
        linear += 4 * hv * h + h * h
        other += 2 * 4 * hv + 2 * h
    # LLM: attention q, k, v, o (Qwen2's q, k, v carry biases), gated MLP, norms (Gemma2 has four per layer).
    linear += layers * (2 * h * q + 2 * h * kv + 3 * h * inter)
    other += layers * ((4 if gemma else 2) * h + (q + 2 * kv if ovis and not gemma else 0)) + h
    other += vocab * h * (1 if ovis else 2)  # embeddings; Mississippi's LM head is untied
    lora = layers * LORA_RANK * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    return {"linear": linear, "other": other, "lora": lora}


def weight_and_state_bytes(params: dict, setting: str, fp32_base: bool) -> float:
    """Weights plus what training keeps per trainable parameter (gradients, AdamW's moments)."""
    base = 4 if fp32_base else 2
    total = params["linear"] + params["other"]
    if setting == "full bf16":
        return total * (base + base + 8)
    lora_state = params["lora"] * 16
    if setting == "QLoRA 4-bit":
        return params["linear"] * NF4_BYTES + params["other"] * base + lora_state
    return total * base + lora_state


def activation_bytes(shape: dict, page: dict, setting: str, fp32_base: bool, checkpointing: bool) -> float:
    """Activation memory of one sample (one page) at its peak (see the module docstring for the formulas)."""
    # Traits of the architecture, read from the shape: a visual vocabulary means a visual tokenizer and head.
    ovis, gemma = "visual_vocab_size" in shape, shape.get("variant") == "ovis1.6"
    full, residual = setting == "full bf16", 4 if fp32_base else 2
    visual = page["tiles"] * page["tokens_per_tile"]
    tokens = visual + TEXT_TOKENS + page["extra_text"]
    h, layers = shape["text_hidden"], shape["text_layers"]
    head_dim = shape.get("text_head_dim", h // shape["text_heads"])
    q, kv, inter = shape["text_heads"] * head_dim, shape["text_kv_heads"] * head_dim, shape["text_intermediate"]

    per_layer = 12 * h + 6 * q + 4 * kv + 8 * inter + (12 * h if gemma else 0)
    if not full:  # LoRA's dropout on every adapted input
        per_layer += 15 * h + 3 * q + 3 * inter
    if gemma:  # eager attention: scores per head and key
        per_layer += 8 * shape["text_heads"] * tokens
    # Checkpointed: each layer's input, plus the layer being recomputed, its activations and their gradients.
    llm = tokens * (layers * residual * h + 2 * per_layer if checkpointing else layers * per_layer)
    llm += TEXT_TOKENS * 10 * shape["vocab_size"]

    visual_head = 12 * shape["visual_vocab_size"] * visual if ovis else 0
    hv, layers_v = shape["vision_hidden"], shape["vision_layers"]
    iv = shape.get("vision_intermediate", 4 * hv)
    patches = page["tiles"] * ((shape["image_size"] // shape["patch_size"]) ** 2 + 1)
    vision_layer = 22 * hv + (8 if ovis and not gemma else 4) * iv  # q = kv = hv; gated MLP for AIMv2
    if not full:  # frozen tower: one layer's working set at a time, and the visual head's transient
        transient = patches * vision_layer + visual_head
        return max(llm, transient)
    vision = patches * (layers_v * residual * hv + 2 * vision_layer if checkpointing else layers_v * vision_layer)
    return llm + vision + visual_head


def estimate(name: str, setting: str, fp32_base: bool, checkpointing: bool = True) -> dict:
    shape, page = FAMILIES[name]
    params = parameters(shape)
    static = weight_and_state_bytes(params, setting, fp32_base)
    per_sample = activation_bytes(shape, page, setting, fp32_base, checkpointing)
    # Samples that fit: static once, activations per sample (batch rows are the same page, no padding).
    fits = {f"max_batch_{card}gib": max(0, int((card * GIB * HEADROOM - static) // per_sample)) for card in CARDS_GIB}
    return {
        "family": name,
        "setting": setting,
        "checkpointing": checkpointing,
        "parameters": params["linear"] + params["other"],
        "trainable": params["lora"] if setting != "full bf16" else params["linear"] + params["other"],
        "tokens_per_sample": page["tiles"] * page["tokens_per_tile"] + TEXT_TOKENS + page["extra_text"],
        "weights_and_state_gib": static / GIB,
        "activations_per_sample_gib": per_sample / GIB,
        "batch1_gib": (static + per_sample) / GIB,
        **fits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32-base", action="store_true", help="fp32 weights under bf16 autocast (our runner today)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    args = parser.parse_args()
    rows = [estimate(name, setting, args.fp32_base) for name in FAMILIES for setting in SETTINGS]
    if args.json:
        rows += [
            estimate(name, setting, args.fp32_base, checkpointing=False) for name in FAMILIES for setting in SETTINGS
        ]
        print(json.dumps({"fp32_base": args.fp32_base, "headroom": HEADROOM, "rows": rows}, indent=2))
        return
    header = [
        "model",
        "setting (checkpointing on)",
        "params",
        "tokens / page",
        "weights + optimizer (GiB)",
        "activations / page (GiB)",
        "batch 1 (GiB)",
        *(f"max batch, {card} GiB" for card in CARDS_GIB),
    ]
    table = [
        [
            r["family"],
            r["setting"],
            f"{r['parameters'] / 1e9:.2f} B",
            f"{r['tokens_per_sample']:,}",
            f"{r['weights_and_state_gib']:.1f}",
            f"{r['activations_per_sample_gib']:.2f}",
            f"{r['batch1_gib']:.1f}",
            *(str(r[f"max_batch_{card}gib"]) for card in CARDS_GIB),
        ]
        for r in rows
    ]
    base = "fp32 base (as our runner loads it)" if args.fp32_base else "bf16 base"
    print(f"Estimates from scripts/memory_model.py, not measured; {base}; {HEADROOM:.0%} of each card usable.\n")
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
