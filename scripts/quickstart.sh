#!/usr/bin/env bash
# The README's first command: install, write synthetic forms, build a tiny model offline, fine-tune it on
# the CPU for a few minutes, and print JSON exact match before and after. Extra arguments are recipe
# overrides, e.g. `bash scripts/quickstart.sh train.max_steps=100`.
#
# Another model: QUICKSTART_MODEL=FAMILY:PRESET, e.g. `QUICKSTART_MODEL=auto:qwen2_5_vl bash scripts/quickstart.sh`
# trains a tiny Qwen2.5-VL through the generic family (presets: `python scripts/make_tiny_checkpoint.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Regenerate when the data on disk came from other settings (an older quickstart), never reuse it silently.
data_args="--preset digits --seed 0 --n-train 2000 --n-val 48 --n-test 48"
if [ "$(cat data/quickstart/.made-with 2>/dev/null)" != "$data_args" ]; then
  .venv/bin/python scripts/make_invoices.py --out data/quickstart $data_args --overwrite
  echo "$data_args" > data/quickstart/.made-with
fi
# Rebuilt every time (about a second, deterministic by seed), so an older quickstart's model is never reused.
model="${QUICKSTART_MODEL:-mississippi:quickstart}"
family="${model%%:*}" preset="${model#*:}"
checkpoint="checkpoints/tiny-mississippi"
[ "$model" = "mississippi:quickstart" ] || checkpoint="checkpoints/tiny-$family-$preset"
.venv/bin/python scripts/make_tiny_checkpoint.py --family "$family" --preset "$preset" --out "$checkpoint" --overwrite
# One process using every core (accelerate launch would otherwise default to one thread per physical core).
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process "$(nproc)" finetune/train.py recipe=quickstart \
  model.family="$family" model.path="$checkpoint" "$@"
