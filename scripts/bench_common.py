"""What the benchmark scripts share: model shapes, the machine's measured matmul peak, memory readings, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Mississippi-shaped models (InternViT-style tower on 448 px tiles, patch 14 → 1,024 patches → 256 tokens per
# tile after the pixel shuffle, exactly as the real checkpoints; Llama LLM). "small" keeps the real tiling and
# token counts with narrower, shallower layers (33 M parameters) so a 2-core CPU trains it in seconds per step;
# its vocabulary is padded to 2,560 rows so the LM head is a similar share of the LLM (6%) as the real 0.8B's
# 32k-row head (10%).
# "0.8b" / "2b" are the real shapes (random init) for a GPU, as /work/shared/reference/models-and-schedules.md gives
# them; "2b" tiles with MSAC, as mississippi-2b does (13 tiles for an A4 page instead of 7). The `ovis2-*` shapes are
# Ovis2's (AIMv2 on 448 px crops, patch 14, hidden_stride 2 → 256 visual tokens per crop, as the real checkpoints;
# Qwen2 LLM with a tied head): "ovis2-small" narrow and shallow for the CPU, "ovis2-1b" the real sizes for a GPU:
# AIMv2-large-patch14-448 (1024 wide, 24 layers, 8 heads of 128, SwiGLU 2816: transformers' Aimv2VisionConfig
# defaults are this model's) + Qwen2.5-0.5B-Instruct (896 wide, 24 layers, 14 / 2 KV heads, SwiGLU 4864, 151,936
# rows, tied); the visual vocabulary of 65,536 is the Ovis1.6 one, unconfirmed for Ovis2. Widths the builder would
# otherwise derive (MLP = 4 × hidden) are given as `*_intermediate`. A shape without `family` is Mississippi.
MODELS = {
    "tiny": {
        "llm": "llama",
        "image_size": 56,
        "patch_size": 14,
        "vision_hidden": 32,
        "vision_layers": 1,
        "text_hidden": 64,
        "text_layers": 1,
    },
    "small": {
        "llm": "llama",
        "image_size": 448,
        "patch_size": 14,
        "vision_hidden": 384,
        "vision_layers": 6,
        "vision_heads": 6,
        "text_hidden": 512,
        "text_layers": 6,
        "text_heads": 8,
        "text_kv_heads": 4,
        "text_intermediate": 1408,
        "vocab_size": 2560,
    },
    "0.8b": {
        "llm": "llama",
        "image_size": 448,
        "patch_size": 14,
        "vision_hidden": 1024,
        "vision_layers": 24,
        "vision_heads": 16,
        "text_hidden": 1536,
        "text_layers": 16,
        "text_heads": 16,
        "text_kv_heads": 8,
        "text_intermediate": 4096,
        "vocab_size": 32000,
    },
    "2b": {
        "llm": "mistral",
        "image_size": 448,
        "patch_size": 14,
        "vision_hidden": 1024,
        "vision_layers": 24,
        "vision_heads": 16,
        "text_hidden": 2560,
        "text_layers": 24,
        "text_heads": 32,
        "text_kv_heads": 8,
        "text_intermediate": 6912,
        "vocab_size": 32010,
        "use_msac": True,
    },
    "ovis2-small": {
        "family": "ovis",
        "variant": "ovis2",
        "image_size": 448,
        "patch_size": 14,
        "vision_hidden": 384,
        "vision_layers": 6,
        "vision_heads": 6,
        "text_hidden": 512,
        "text_layers": 6,
        "text_heads": 8,
        "text_kv_heads": 4,
        "visual_vocab_size": 4096,
        "vocab_size": 2560,
    },
    "ovis2-1b": {
        "family": "ovis",
        "variant": "ovis2",
        "image_size": 448,
        "patch_size": 14,
        "vision_hidden": 1024,
        "vision_layers": 24,
        "vision_heads": 8,
        "vision_intermediate": 2816,
        "text_hidden": 896,
        "text_layers": 24,
        "text_heads": 14,
        "text_kv_heads": 2,
        "text_intermediate": 4864,
        "visual_vocab_size": 65536,
        "vocab_size": 151936,
    },
}


def model_family(shape: str) -> str:
    return MODELS[shape].get("family", "mississippi")


def build_model(out: Path, shape: str) -> Path:
    """The checkpoint for `shape` under `out`, built once (in its family's original Hub layout) and reused."""
    from finetune.models import get_family

    folder = out / f"model-{shape}"
    marker = folder / ".shape.json"
    if not (marker.exists() and json.loads(marker.read_text()) == MODELS[shape]):
        sizes = {k: v for k, v in MODELS[shape].items() if k != "family"}
        get_family(model_family(shape)).build_tiny_checkpoint(folder, **sizes)
        marker.write_text(json.dumps(MODELS[shape]))
    return folder


def matmul_peak_flops(device: str = "cpu", dtype: str = "fp32", seconds: float = 1.0) -> dict:
    """The machine's achievable matmul rate: the best FLOP/s of square matmuls of a few sizes, each run for
    about `seconds` (the denominator of MFU; a datasheet peak would flatter nobody on a shared VM)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = {"flops": 0.0, "size": 0}
    for size in (1024, 2048, 4096) if device == "cpu" else (4096, 8192):
        a = torch.randn(size, size, device=device, dtype=torch_dtype)
        b = torch.randn(size, size, device=device, dtype=torch_dtype)
        a @ b  # warm-up: thread pool, allocation
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            runs += 1
            if device != "cpu":
                sync()
        sync()
        flops = 2 * size**3 * runs / (time.perf_counter() - started)
        if flops > best["flops"]:
            best = {"flops": flops, "size": size}
    return best


# Dense bf16 tensor-core peaks from the datasheets (FLOP/s), keyed by a substring of torch.cuda.get_device_name():
# the conventional MFU denominator, beside the measured matmul rate. More specific names first (H100 PCIe is 756).
DATASHEET_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("A10G", 125e12),
)


def datasheet_peak_flops(device_name: str) -> tuple[str, float] | None:
    """The datasheet's dense bf16 peak of this GPU as (the matched name, FLOP/s), or None for a card not listed."""
    return next(((name, peak) for name, peak in DATASHEET_BF16_PEAKS if name in device_name), None)


def memory_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(device: str = "cpu") -> float:
    """CPU: the process's resident high-water mark (VmHWM); GPU: the allocator's peak."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return memory_kib("VmHWM") / 1024


def reset_peak_memory(device: str = "cpu") -> None:
    """Start the peak-memory reading afresh (after set-up: dataset decoding and model loading are not training)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident size


def machine() -> str:
    """One line: CPU model and cores (or the GPU), torch version, threads."""
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} × {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_child(script: str, config: dict, env: dict | None = None) -> dict:
    """Run `script --child CONFIG` in a fresh process (clean memory peak, nothing shared) and return its last
    stdout line as JSON; its stderr passes through, so progress and errors stay visible."""
    result = subprocess.run(
        [sys.executable, script, "--child", json.dumps(config)],
        check=False,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise SystemExit(f"{Path(script).name}: child {config.get('role', '')} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
