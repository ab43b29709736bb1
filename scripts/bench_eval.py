"""Generation speed of evaluation: batched vs one at a time, and what schema-constrained decoding costs.

    python scripts/bench_eval.py [--samples 16] [--max-new-tokens 48] [--out runs/bench-eval]

A Mississippi-shaped model (the one scripts/bench_stage_memory.py builds: InternViT-style tower on 224 px tiles,
Llama LLM; random init) generates for synthetic invoices tiled the real way, through the same `evaluate` the
trainer and `finetune.eval` use. A random model rarely stops by itself, so unconstrained rows generate
`--max-new-tokens` tokens per sample; constrained rows stop when the JSON closes (strings bounded to 8
characters), so compare generated tokens/s across those rows, samples/s within them. Each configuration runs
once after one warm-up batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="runs/bench-eval")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from bench_stage_memory import MODEL

    from finetune.constrained import JsonConstraint
    from finetune.data.dataset import prepare_samples
    from finetune.data.prompt import derive_skeleton, render_instruction
    from finetune.data.sources import read_records
    from finetune.evaluation import evaluate
    from finetune.models import get_family
    from finetune.synthetic.invoices import write_dataset

    out = Path(args.out)
    checkpoint, data = out / "model", out / "data"
    family = get_family("mississippi")
    if not (checkpoint / "config.json").exists():
        family.build_tiny_checkpoint(checkpoint, **MODEL)
    if not (data / "test.jsonl").exists():
        write_dataset(data, seed=0, n_train=1, n_val=1, n_test=args.samples, preset="form")
    torch.manual_seed(0)
    processor = family.load_processor(str(checkpoint), max_tiles_per_image=6)
    skeleton = derive_skeleton(r.target for r in read_records(data / "test.jsonl"))
    instruction = render_instruction(
        "Extract the fields from the form image and structure them into JSON format:", skeleton
    )
    samples, _ = prepare_samples(
        data / "test.jsonl",
        split="test",
        family=family,
        processor=processor,
        instruction_text=instruction,
        skeleton=skeleton,
        max_length=1 << 16,
    )
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(family.load_model(str(checkpoint)).eval())
    constraint = JsonConstraint.for_model(model, family, processor, skeleton, max_string_length=8)

    def run(batch_size: int, constrained: bool) -> dict:
        common = {
            "family": family,
            "processor": processor,
            "instruction_text": instruction,
            "accelerator": accelerator,
            "max_new_tokens": args.max_new_tokens,
            "constraint": constraint if constrained else None,
            "skeleton": skeleton,
        }
        evaluate(model, samples[:batch_size], batch_size=batch_size, **common)  # warm-up
        start = time.perf_counter()
        result = evaluate(model, samples, batch_size=batch_size, **common)
        seconds = time.perf_counter() - start
        tokens = sum(
            len(processor.tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in result.predictions
        )  # + the stop token
        return {
            "batch": batch_size,
            "constrained": constrained,
            "seconds": seconds,
            "samples_per_s": len(samples) / seconds,
            "tokens_per_s": tokens / seconds,
            "valid_json": result.metrics["valid_json_rate"],
            "schema": result.metrics["schema_conformance_rate"],
        }

    rows = [run(1, False), run(8, False), run(1, True), run(8, True)]
    average = sum(s.length for s in samples) // len(samples)
    print(
        f"{len(samples)} samples, {average} tokens each on average (prompt + answer), "
        f"max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads"
    )
    print("| batch | constrained | seconds | samples/s | generated tokens/s | valid JSON | schema-valid |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {'yes' if r['constrained'] else 'no'} | {r['seconds']:.1f} | {r['samples_per_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['valid_json']:.0%} | {r['schema']:.0%} |"
        )
    base = {(r["batch"], r["constrained"]): r for r in rows}
    print(
        f"batched / one at a time: {base[(8, False)]['samples_per_s'] / base[(1, False)]['samples_per_s']:.2f}× "
        f"samples/s unconstrained, {base[(8, True)]['samples_per_s'] / base[(1, True)]['samples_per_s']:.2f}× "
        f"constrained; constrained / unconstrained tokens/s at batch 8: "
        f"{base[(8, True)]['tokens_per_s'] / base[(8, False)]['tokens_per_s']:.2f}×"
    )


if __name__ == "__main__":
    main()
