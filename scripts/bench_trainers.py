"""The processes `bench_train.py` runs: the matmul peak, the model's FLOPs, and one per trainer (ours, a bare
loop, TRL's SFTTrainer). Each returns a JSON-able dict; `bench_train.py` documents what they measure."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench_common import matmul_peak_flops, peak_memory_mib, reset_peak_memory

INSTRUCTION = "Extract the details from the invoice image and structure them into JSON format:"
GROUPS = {
    "lora": {"vision": "frozen", "projector": "frozen", "llm": "lora"},
    "full": {"vision": "full", "projector": "full", "llm": "full"},
}
LR = 1e-5


# ------------------------------------------------------------------------------------------- shared set-up
def _setup_torch(config: dict):
    import torch

    torch.manual_seed(0)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    return torch


def _samples(config: dict):
    """The family, processor, instruction and validated samples, exactly as the trainer prepares them."""
    from finetune.data.dataset import prepare_samples
    from finetune.data.prompt import derive_skeleton, render_instruction
    from finetune.data.sources import read_records
    from finetune.models import get_family

    family = get_family(config.get("family", "mississippi"))
    processor = family.load_processor(config["checkpoint"])
    skeleton = derive_skeleton(record.target for record in read_records(config["data"]))
    instruction = render_instruction(INSTRUCTION, skeleton)
    samples, report = prepare_samples(
        config["data"],
        split="train",
        family=family,
        processor=processor,
        instruction_text=instruction,
        skeleton=skeleton,
        max_length=16384,
    )
    if report.kept != report.read:
        raise RuntimeError(report.summary())
    return family, processor, instruction, samples, skeleton


def _model(config: dict, family, *, checkpointing: bool | None = None):
    """The checkpoint with the benchmark's trainable set (our tuning code: PEFT LoRA or everything)."""
    import torch

    from finetune.config import TuningSection
    from finetune.training.tuning import apply_tuning, enable_gradient_checkpointing

    model = family.load_model(config["checkpoint"], attn_implementation=config["attn"])
    model.config.use_cache = False
    if config["checkpointing"] if checkpointing is None else checkpointing:
        enable_gradient_checkpointing(model)
    model, _ = apply_tuning(
        model, family, TuningSection(lora={"dropout": config["lora_dropout"]}), groups=GROUPS[config["tuning"]]
    )
    return model.to(config["device"]).train(), torch


def _autocast(config: dict):
    import contextlib

    import torch

    if config["precision"] == "bf16":
        return torch.autocast(config["device"].split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(config: dict) -> None:
    if config["device"].startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ children
def child_peak(config: dict) -> dict:
    _setup_torch(config)
    return matmul_peak_flops(config["device"], config["precision"])


def child_flops(config: dict) -> dict:
    """Model FLOPs per real token of this data: each sample's forward + backward counted alone.

    A sample's FLOPs are v·tiles + a·tokens + b·tokens² (tiles go through the tower independently; the LLM's
    matmuls are linear in the tokens and attention quadratic), so three samples of distinct shapes fix v, a, b
    and a fourth checks the fit before it is applied to every sample."""
    _setup_torch(config)
    import numpy as np
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.data.dataset import Collator, DocumentDataset

    family, processor, instruction, samples, _ = _samples(config)
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction)
    collate = Collator(family, processor.tokenizer.pad_token_id)
    # Model FLOPs: no recomputation. On the CPU, eager attention, whose score matmuls the counter sees (it has no
    # formula for the CPU flash-attention kernel, which SDPA runs there, and would count its FLOPs as zero). On a GPU,
    # SDPA, which the counter knows: eager would keep every layer's heads × tokens² scores, tens of GB for a real
    # shape's long pages; its backward formula recomputes the scores, one of its five equal matmuls, taken off.
    cuda = config["device"].startswith("cuda")
    model, _ = _model({**config, "attn": "sdpa" if cuda else "eager"}, family, checkpointing=False)

    def count(item) -> int:
        batch = collate([item])
        batch.pop("index")
        batch = {k: v.to(config["device"]) for k, v in batch.items()}
        counter = FlopCounterMode(display=False)
        with counter, _autocast(config):
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        by_op = counter.get_flop_counts().get("Global", {})
        recomputed = sum(f for op, f in by_op.items() if "scaled_dot_product" in str(op) and "backward" in str(op)) / 5
        return counter.get_total_flops() - round(recomputed)

    def tiles(sample) -> int:  # from the image sizes (headers only), as the trainer's length check does
        sizes = []
        for ref in sample.images:
            with Image.open(ref) as image:
                sizes.append(image.size)
        return sum(processor.tiles_for(sizes))

    shapes = [(sample.length, tiles(sample), i) for i, sample in enumerate(samples)]
    probes, seen = [], set()
    # Probe shapes far apart in length (a well-conditioned fit), then any other distinct shape.
    for tokens, n, i in sorted(shapes)[:: max(1, len(shapes) // 4)] + shapes:
        if (tokens, n) not in seen:
            seen.add((tokens, n))
            item = dataset[i]
            assert (len(item["input_ids"]), int(item["pixel_values"].shape[0])) == (tokens, n)
            probes.append((tokens, n, item))
        if len(probes) == 4:
            break
    counted = [(t, n, count(item)) for t, n, item in probes]
    flops_of = None
    if len(counted) == 4:
        matrix = np.array([[n, t, t * t] for t, n, _ in counted[:3]], dtype=np.float64)
        if np.linalg.matrix_rank(matrix) == 3:
            v, a, b = np.linalg.solve(matrix, np.array([f for _, _, f in counted[:3]], dtype=np.float64))
            t, n, f = counted[3]
            if b > 0 and abs(v * n + a * t + b * t * t - f) <= 1e-6 * f:  # b: attention is counted

                def flops_of(t, n):
                    return v * n + a * t + b * t * t

    if flops_of is None:  # the fit cannot be trusted (or too few distinct shapes): count every sample
        exact = {(t, n): f for t, n, f in counted}
        total = sum(exact.get((t, n)) or count(dataset[i]) for t, n, i in shapes)
    else:
        total = sum(flops_of(t, n) for t, n, _ in shapes)
    tokens = sum(t for t, _, _ in shapes)
    return {
        "flops_per_token": total / tokens,
        "samples": len(shapes),
        "tokens": tokens,
        "tiles": sum(n for _, n, _ in shapes),
        "fitted": flops_of is not None,
        "coefficients": [float(v), float(a), float(b)] if flops_of is not None else None,
    }


def _tokens_per_tile(processor) -> int:
    """Image tokens per tile (Mississippi) or crop (Ovis): what one pass of the vision tower produces."""
    settings = processor.settings
    return getattr(settings, "tokens_per_tile", None) or settings.tokens_per_crop


def _row_shapes(batch: dict, processor) -> list[list[int]]:
    """[real tokens, tiles] of each row of a batch (tiles from the row's image tokens)."""
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
    return [
        [int(t), int(i) // _tokens_per_tile(processor)]
        for t, i in zip(batch["attention_mask"].sum(dim=1), image_tokens, strict=True)
    ]


def child_ours(config: dict) -> dict:
    _setup_torch(config)
    from finetune.recipe import validate_recipe
    from finetune.training.runner import FineTuneRecipe

    run_dir = Path(config["out"]) / "ours-run"
    recipe = validate_recipe(
        {
            "model": {
                "family": config.get("family", "mississippi"),
                "path": config["checkpoint"],
                "attn_implementation": config["attn"],
            },
            "data": {"train": config["data"], "prompt": {"instruction": INSTRUCTION}, "max_length": 16384},
            "tuning": {
                "groups": GROUPS[config["tuning"]],
                "gradient_checkpointing": config["checkpointing"],
                "lora": {"dropout": config["lora_dropout"]},
                **({"quantization": {"bits": config["quantization"]}} if config.get("quantization") else {}),
            },
            "optim": {"lr": LR, "scheduler": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
            "train": {
                "max_steps": config["total_steps"],
                "batch_size": config["batch_size"],
                "log_every": 1,
                "precision": config["precision"],
                "seed": 0,
            },
            "eval": {"before_training": False, "after_training": False},
            "output": {"dir": str(run_dir), "if_exists": "overwrite"},
        },
        source="bench_train",
    )
    job = FineTuneRecipe(recipe)
    job.setup()
    # Observe (not change) each micro-batch on its way into the forward, for the FLOPs of the samples it holds.
    shapes, forward_inputs = [], job.family.training_inputs
    job.family.training_inputs = lambda batch: (
        shapes.append(_row_shapes(batch, job.processor)),
        forward_inputs(batch),
    )[1]
    reset_peak_memory(config["device"])
    job.train()
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # On a GPU the runner reads and resets the allocator's peak at every log line: the peak is the highest of those.
    peak_mib = max([s.get("cuda_peak_mib", 0.0) for s in steps] + [peak_memory_mib(config["device"])])
    return {
        "steps": [
            {
                "seconds": s["seconds"],
                "samples": s["samples"],
                "tokens": s["tokens"],
                "positions": s["tokens"] + s["padded_positions"],
                "loss": s["loss"],
                "rows": rows,
            }
            for s, rows in zip(steps, shapes, strict=True)
        ],
        "peak_mib": peak_mib,
        "weights_mib": _weights_mib(job.model),
    }


def _weights_mib(model) -> float:
    """The model's parameters and buffers as stored (bitsandbytes' packed 4-bit / int8 weights at their size)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def child_ours_quantized(config: dict) -> dict:
    """Ours with the frozen base quantised (QLoRA): `ours-4bit`, `ours-8bit`."""
    return child_ours({**config, "quantization": int(config["role"].removeprefix("ours-").removesuffix("bit"))})


def child_bare(config: dict) -> dict:
    torch = _setup_torch(config)
    from finetune.data.dataset import Collator, DocumentDataset
    from finetune.training.sampler import EpochLengthGroupedSampler

    family, processor, instruction, samples, _ = _samples(config)
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction)
    # The batches our trainer draws for seed 0: the same sampler, generator and collator.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config["batch_size"],
        generator=torch.Generator().manual_seed(0),
        sampler=EpochLengthGroupedSampler(dataset.lengths, batch_size=config["batch_size"], seed=0),
        collate_fn=Collator(family, processor.tokenizer.pad_token_id, padding_side="right"),
    )
    model, _ = _model(config, family)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    reset_peak_memory(config["device"])
    steps, last = [], time.perf_counter()
    for step, batch in enumerate(loader):
        if step == config["total_steps"]:
            break
        batch.pop("index")
        mask, rows = batch["attention_mask"], _row_shapes(batch, processor)
        batch = {k: v.to(config["device"]) for k, v in batch.items()}
        with _autocast(config):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()
        _sync(config)
        now = time.perf_counter()
        steps.append(
            {
                "seconds": now - last,
                "samples": int(mask.shape[0]),
                "tokens": int(mask.sum()),
                "positions": int(mask.numel()),
                "loss": loss,
                "rows": rows,
            }
        )
        last = now
    return {"steps": steps, "peak_mib": peak_memory_mib(config["device"])}


def _trl_processor(processor):
    """Our H2OVL processor as the `ProcessorMixin` TRL requires: calls and chat templates forward to it."""
    from transformers import ProcessorMixin

    class H2OVLProcessorForTRL(ProcessorMixin):
        attributes = ["tokenizer"]  # noqa: RUF012 (ProcessorMixin's own class attribute)
        tokenizer_class = "AutoTokenizer"

        def __init__(self, tokenizer, inner=None):
            super().__init__(tokenizer)
            self.inner = inner

        def __call__(self, images=None, text=None, **kwargs):
            return self.inner(images=images, text=text, **kwargs)

        def apply_chat_template(self, conversation, **kwargs):
            return self.tokenizer.apply_chat_template(conversation, **kwargs)

    return H2OVLProcessorForTRL(processor.tokenizer, inner=processor)


def child_trl(config: dict) -> dict:
    torch = _setup_torch(config)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.config import LoraSection
    from finetune.data.dataset import load_image
    from finetune.data.prompt import canonical_json
    from finetune.data.sources import read_records
    from finetune.training.tuning import lora_targets

    family, processor, instruction, samples, skeleton = _samples(config)
    records = list(read_records(config["data"]))
    dataset = Dataset.from_list(
        [
            {
                "images": [load_image(ref) for ref in record.images],
                "prompt": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}] * len(record.images) + [{"type": "text", "text": instruction}],
                    }
                ],
                "completion": [
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": canonical_json(record.target, skeleton)}],
                    }
                ],
            }
            for record in records
        ]
    )
    model = family.load_model(config["checkpoint"], attn_implementation=config["attn"]).to(config["device"])
    peft_config = None
    if config["tuning"] == "lora":  # the adapter our tuning code builds: same rank, alpha, dropout, targets
        lora = LoraSection(dropout=config["lora_dropout"])
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=family.lora_target_regex(lora_targets(family, lora, ["llm"])),
        )
    args = SFTConfig(
        output_dir=str(Path(config["out"]) / "trl-run"),
        per_device_train_batch_size=config["batch_size"],
        max_steps=config["total_steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=config["checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,
        completion_only_loss=True,
        use_cpu=config["device"] == "cpu",
        bf16=config["precision"] == "bf16",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    from finetune.training.sampler import EpochLengthGroupedSampler

    # The batches ours and the bare loop draw (per-token speed depends on sequence length, so other samples would
    # blur the comparison); TRL's own random batching is measured for its padding below, without training.
    order = list(EpochLengthGroupedSampler([s.length for s in samples], batch_size=config["batch_size"], seed=0))

    class SameBatchesSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return order

    trainer_class = SameBatchesSFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=_trl_processor(processor),
        peft_config=peft_config,
    )

    batches, steps = [], []
    collate = trainer.data_collator
    # Padding of TRL's default batches (a random order over the whole set) for as many samples as the run trains.
    batch_size, draws = config["batch_size"], config["total_steps"] * config["batch_size"]
    random_order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:draws].tolist()
    masks = [
        collate([dataset[i] for i in random_order[j : j + batch_size]])["attention_mask"]
        for j in range(0, draws, batch_size)
    ]
    default_padding = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def counting_collator(examples):  # TRL builds the batch; we only read its mask
        batch = collate(examples)
        mask = batch["attention_mask"]
        batches.append(
            {
                "samples": int(mask.shape[0]),
                "tokens": int(mask.sum()),
                "positions": int(mask.numel()),
                "rows": _row_shapes(batch, processor),
            }
        )
        return batch

    trainer.data_collator = counting_collator

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(config)
            now = time.perf_counter()
            steps.append({"seconds": now - self.last})
            self.last = now

    trainer.add_callback(StepTimer())
    reset_peak_memory(config["device"])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    for step, batch, loss in zip(steps, batches, losses, strict=False):
        step.update(batch, loss=loss)
    return {
        "steps": steps,
        "peak_mib": peak_memory_mib(config["device"]),
        "trainable_params": trainable,
        "default_order_padding": default_padding,
    }


CHILDREN = {
    "peak": child_peak,
    "flops": child_flops,
    "ours": child_ours,
    "ours-4bit": child_ours_quantized,
    "ours-8bit": child_ours_quantized,
    "bare": child_bare,
    "trl": child_trl,
}
