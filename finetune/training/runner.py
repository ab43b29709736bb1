"""The fine-tuning recipe: setup → evaluate base → train → evaluate → save, on Accelerate.

Engine: our own loop on `accelerate.Accelerator` (device placement, DDP / DeepSpeed / FSDP, mixed precision,
no_sync, checkpoint state and trackers all come from Accelerate). Not transformers' Trainer, because a recipe
runs generated-JSON evaluation mid-training and (next) several freezing stages with a fresh optimizer each in
one job — both fight Trainer's single optimizer / single eval-loss lifecycle.

Loss normalisation follows Accelerate's documented pattern for token-level losses: each optimizer step sums
the cross-entropy over all label tokens of its G micro-batches on all processes and divides by that global
count, so long and short answers weigh the same whatever the batching.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from finetune.config import Recipe
from finetune.data.dataset import Collator, DataReport, DocumentDataset, prepare_samples
from finetune.data.prompt import derive_skeleton, render_instruction
from finetune.data.sources import read_records
from finetune.errors import UserError
from finetune.evaluation import evaluate, write_eval
from finetune.models import get_family
from finetune.recipe import dump_recipe
from finetune.training.checkpoint import TrainerState, latest_checkpoint, prune_checkpoints
from finetune.training.sampler import EpochLengthGroupedSampler
from finetune.training.tuning import apply_tuning, optimizer_groups

log = logging.getLogger("finetune")

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Recipe keys a resumed run may change (prefixes of the flattened key paths).
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.num_workers", "eval.", "tracking.", "output.")


class FineTuneRecipe:
    """One training job described by a :class:`~finetune.config.Recipe`."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = Path(recipe.output.dir)
        self.state = TrainerState()

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build everything: accelerator, run folder, data (validated, reported), model, optimizer."""
        r = self.recipe
        self.family = get_family(r.model.family)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=r.train.grad_accum,
            mixed_precision=MIXED_PRECISION[r.train.precision],
            log_with=r.tracking.report_to or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step, not per process
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        set_seed(r.train.seed)
        resume_from = self._prepare_run_dir()

        self.processor = self.family.load_processor(r.model.path, r.model.revision, **r.model.processor)
        self._prepare_data()
        self._record_recipe(resumed=resume_from is not None)

        model = self.family.load_model(r.model.path, revision=r.model.revision,
                                       attn_implementation=r.model.attn_implementation)
        model.config.use_cache = False
        if r.tuning.gradient_checkpointing:
            # Non-reentrant checkpointing: works when the inputs of a checkpointed block need no grad (frozen
            # vision tower under LoRA), where the reentrant variant silently drops the gradient.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model, self.plan = apply_tuning(model, self.family, r.tuning)
        self._info(f"tuning: {self.plan.summary()}")

        optimizer = torch.optim.AdamW(
            optimizer_groups(model, self.family, r.lr_for, r.optim.weight_decay),
            betas=r.optim.betas, eps=r.optim.eps,
        )
        self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, optimizer,
                                                                                 self._train_loader())
        self.batches_per_epoch = len(self.train_loader)  # per process, after Accelerate sharded the batches
        self.total_steps = self._total_steps()
        warmup = r.optim.warmup_steps if r.optim.warmup_steps is not None else round(r.optim.warmup_ratio *
                                                                                     self.total_steps)
        scheduler = get_scheduler(r.optim.scheduler if r.optim.scheduler != "constant" else "constant_with_warmup",
                                  self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)
        self.scheduler = self.accelerator.prepare(scheduler)
        micro_batches = self.total_steps * r.train.grad_accum
        self._info(f"{self.total_steps} optimizer steps of {r.train.grad_accum} × {r.train.batch_size} samples × "
                   f"{self.accelerator.num_processes} processes = {micro_batches / self.batches_per_epoch:.2f} "
                   f"epochs of {len(self.train_samples)} samples (the data stream runs on across epoch ends)")
        self.accelerator.register_save_state_pre_hook(self._keep_trainable_weights_only)

        if r.tracking.report_to:
            self.accelerator.init_trackers(r.tracking.project, config=_flatten(r.model_dump(mode="json")),
                                           init_kwargs=_tracker_kwargs(r))
        if resume_from:
            self._resume(resume_from)

    def _prepare_run_dir(self) -> Path | None:
        """Refuse to reuse a run folder unless the recipe says resume or overwrite. Returns a checkpoint to
        resume from, if any."""
        policy = self.recipe.output.if_exists
        exists = self.run_dir.exists() and any(self.run_dir.iterdir())
        resume_from = None
        if exists and policy == "error":
            raise FileExistsError(f"{self.run_dir}: run folder exists; set output.if_exists=resume to continue it "
                                  f"or output.if_exists=overwrite to replace it")
        if exists and policy == "resume":
            resume_from = latest_checkpoint(self.run_dir)
            if resume_from is None:
                raise FileNotFoundError(f"{self.run_dir}: output.if_exists=resume but the run has no checkpoint")
        self.accelerator.wait_for_everyone()  # every rank has looked before rank 0 changes anything
        if self.accelerator.is_main_process:
            if exists and policy == "overwrite":
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        return resume_from

    def _record_recipe(self, resumed: bool) -> None:
        """Save the resolved recipe (derived prompt skeleton included). A resumed run must be the same run:
        only budgets, checkpoint cadence, evaluation and tracking may change; the original record is kept."""
        path = self.run_dir / "recipe.yaml"
        if resumed:
            saved = _flatten(yaml.safe_load(path.read_text()))
            current = _flatten(self.recipe.model_dump(mode="json"))
            changed = sorted(k for k in saved.keys() | current.keys()
                             if saved.get(k) != current.get(k) and not k.startswith(RESUME_MAY_CHANGE))
            if changed:
                raise UserError(f"{path}: cannot resume with a different recipe; changed: {', '.join(changed)} "
                                f"(only {', '.join(RESUME_MAY_CHANGE)} may change)")
            return
        if self.accelerator.is_main_process:
            dump_recipe(self.recipe, path)

    def _prepare_data(self) -> None:
        d = self.recipe.data
        skeleton = d.prompt.skeleton
        if skeleton is None:
            skeleton = derive_skeleton(rec.target for rec in read_records(
                d.train, image_column=d.image_column, target_column=d.target_column)
                if isinstance(rec.target, dict))
        d.prompt.skeleton = skeleton  # recorded in recipe.yaml: the exact prompt a trained model expects
        self.instruction_text = render_instruction(d.prompt.instruction, skeleton)
        common = dict(family=self.family, processor=self.processor, instruction_text=self.instruction_text,
                      skeleton=skeleton, max_length=d.max_length, on_bad_sample=d.on_bad_sample,
                      image_column=d.image_column, target_column=d.target_column)
        self.train_samples, train_report = prepare_samples(d.train, split="train", limit=d.max_train_samples,
                                                           **common)
        reports = [train_report]
        eval_source = getattr(d, self.recipe.eval.split)
        self.eval_samples = []
        if eval_source is not None:
            self.eval_samples, eval_report = prepare_samples(eval_source, split=self.recipe.eval.split,
                                                             limit=self.recipe.eval.max_samples, **common)
            reports.append(eval_report)
        for report in reports:
            self._info(f"data {report.summary()}")
        if self.accelerator.is_main_process:
            (self.run_dir / "data_report.json").write_text(json.dumps(
                {rep.split: {"read": rep.read, "kept": rep.kept, "skipped": dict(rep.skipped),
                             "first_skipped_at": rep.examples} for rep in reports}, indent=2) + "\n")
        if not self.train_samples:
            raise ValueError(f"data.train: no usable samples ({train_report.summary()})")
        self.reports: list[DataReport] = reports

    def _train_loader(self) -> torch.utils.data.DataLoader:
        t = self.recipe.train
        dataset = DocumentDataset(self.train_samples, family=self.family, processor=self.processor,
                                  instruction_text=self.instruction_text)
        sampler = EpochLengthGroupedSampler(dataset.lengths, batch_size=t.batch_size, seed=t.seed,
                                            group_by_length=t.group_by_length)
        return torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
            # Its own generator: starting an iterator draws a seed from it, and drawing from the global RNG
            # instead would shift dropout masks between a resumed and an uninterrupted run.
            generator=torch.Generator().manual_seed(t.seed),
            collate_fn=Collator(self.family, self.processor.tokenizer.pad_token_id, padding_side="right"))

    def _total_steps(self) -> int:
        t = self.recipe.train
        if t.max_steps:
            return t.max_steps
        return max(1, math.ceil(t.epochs * self.batches_per_epoch / t.grad_accum))

    # ------------------------------------------------------------------------------------------------- train
    def run(self) -> dict:
        """Evaluate the base model, train, evaluate again, save; returns the before/after metrics."""
        metrics = self._load_metrics()
        if self.recipe.eval.before_training and "before" not in metrics and self.eval_samples:
            metrics["before"] = self.evaluate("before")
            self._save_metrics(metrics)
        self.train()
        self.save_final()
        if self.recipe.eval.after_training and self.eval_samples:
            metrics["after"] = self.evaluate("after")
            self._save_metrics(metrics)
        self.accelerator.end_training()
        self._info(self._summary(metrics))
        return metrics

    def _summary(self, metrics: dict) -> str:
        def em(tag: str) -> str:
            return f"{metrics[tag]['json_exact_match']:.1%}" if tag in metrics else "n/a"

        what = "adapter" if self.plan.uses_lora else "model"
        return (f"done: JSON exact match on {self.recipe.eval.split} {em('before')} before -> {em('after')} after; "
                f"{what} in {self.run_dir / 'final'}, metrics and predictions in {self.run_dir}")

    def train(self) -> None:
        """Optimizer steps until the step budget; the data stream runs across epoch boundaries."""
        r, acc = self.recipe, self.accelerator
        G = r.train.grad_accum
        batches = self._batch_stream()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, disable=not acc.is_main_process,
                   desc="train", dynamic_ncols=True)
        tokens_since, time_since = 0, time.perf_counter()
        while self.state.global_step < self.total_steps:
            micro = [next(batches) for _ in range(G)]
            label_tokens = sum((b["labels"] != -100).sum() for b in micro)
            global_label_tokens = acc.gather(label_tokens.reshape(1).to(acc.device)).sum()
            step_loss = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro):
                batch.pop("index")
                sync = i == len(micro) - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                    out = self.model(**batch, num_items_in_batch=global_label_tokens)
                    # ×G cancels Accelerate's division by the accumulation steps; ×processes cancels DDP's
                    # gradient averaging: together the gradient is that of sum(CE) / all label tokens.
                    acc.backward(out.loss * G * acc.num_processes)
                step_loss += out.loss.detach()
                tokens_since += int(batch["attention_mask"].sum())
            if r.optim.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), r.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1

            loss = acc.reduce(step_loss, reduction="sum").item()  # per-rank partial sums → the global mean
            self._log_step(bar, loss, tokens_since * acc.num_processes / (time.perf_counter() - time_since))
            tokens_since, time_since = 0, time.perf_counter()
            every = r.train.checkpoint_every
            if every and (self.state.global_step % every == 0 or self.state.global_step == self.total_steps):
                self.save_checkpoint()
        bar.close()
        self._check_replicas_agree()

    def _check_replicas_agree(self) -> None:
        """Data-parallel replicas must end bit-identical; a silent divergence would make the saved model depend
        on which rank wrote it. One hash per rank over the trainable weights, compared on every rank."""
        if self.accelerator.num_processes == 1 or self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
            return  # sharded engines hold different shards by design
        digest = hashlib.sha256()
        for name, param in self.accelerator.unwrap_model(self.model).named_parameters():
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged: weight hashes per rank {digests}")
        self._info(f"trainable weights identical on all {len(digests)} processes (sha256 {digests[0][:12]})")

    def _batch_stream(self):
        """Micro-batches forever, epoch after epoch, resuming mid-epoch exactly where the state says."""
        while True:
            epoch = self.state.epoch
            self.train_loader.set_epoch(epoch)
            loader = self.train_loader
            if self.state.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
            for batch in loader:
                self.state.batches_in_epoch += 1
                if self.state.batches_in_epoch == self.batches_per_epoch:
                    # Advance now, not after the loop, so a checkpoint taken here says "next epoch, batch 0".
                    self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
                yield batch
            if self.state.epoch == epoch:
                raise RuntimeError(f"epoch {epoch} ended after {self.state.batches_in_epoch} batches, "
                                   f"expected {self.batches_per_epoch}")

    def _log_step(self, bar, loss: float, tokens_per_s: float) -> None:
        step = self.state.global_step
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        lr = max(lrs.values())
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", epoch=self.state.epoch)
        if step % self.recipe.train.log_every == 0 or step == self.total_steps:
            record = {"step": step, "epoch": self.state.epoch, "loss": loss, "tokens_per_s": tokens_per_s,
                      **{f"lr/{k}": v for k, v in lrs.items()}}
            self.accelerator.log(record, step=step)
            if self.accelerator.is_main_process:
                with (self.run_dir / "train_log.jsonl").open("a") as handle:
                    handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """A resumable checkpoint: trainable weights, optimizer, scheduler, RNG and data position."""
        path = self.run_dir / "checkpoints" / f"step_{self.state.global_step:06d}"
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()  # every rank's files are written before the completeness marker
        if self.accelerator.is_main_process:
            self.state.save(path)
            prune_checkpoints(self.run_dir, keep=self.recipe.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def _keep_trainable_weights_only(self, models, weights, output_dir) -> None:
        # Frozen weights come back from the base checkpoint on resume; saving them would make every LoRA
        # checkpoint as large as the model.
        trainable = {n for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad}
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable}

    def _resume(self, checkpoint: Path) -> None:
        self.accelerator.load_state(str(checkpoint), strict=False)
        self.state = TrainerState.load(checkpoint)
        self._info(f"resumed from {checkpoint} at step {self.state.global_step} "
                   f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch})")

    # ------------------------------------------------------------------------------------------ eval / save
    def evaluate(self, tag: str) -> dict:
        """Generate on the eval split and score; writes `{tag}_predictions.jsonl` / `{tag}_metrics.json`."""
        e = self.recipe.eval
        result = evaluate(self.model, self.eval_samples, family=self.family, processor=self.processor,
                          instruction_text=self.instruction_text, accelerator=self.accelerator,
                          batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
        if self.accelerator.is_main_process:
            write_eval(result, self.run_dir / "eval", prefix=f"{tag}_")
            if tag == "after":
                write_eval(result, self.run_dir)  # the run folder's predictions.jsonl
        self.accelerator.log({f"eval/{tag}/{k}": v for k, v in result.metrics.items()}, step=self.state.global_step)
        self._info(f"eval {tag}: JSON exact match {result.metrics['json_exact_match']:.1%} "
                   f"(valid JSON {result.metrics['valid_json_rate']:.1%}, n={result.metrics['num_samples']})")
        return result.metrics

    def save_final(self) -> Path:
        """`final/`: the adapter (LoRA runs) or the whole model, with processor, tokenizer and chat template."""
        out = self.run_dir / "final"
        state_dict = self.accelerator.get_state_dict(self.model)  # gathers sharded (ZeRO-3 / FSDP) weights
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.plan.uses_lora:
                unwrapped.save_pretrained(out, state_dict=state_dict)
                self.processor.save_pretrained(out)
            else:
                self.family.save_pretrained(unwrapped, self.processor, out, source_path=self.recipe.model.path,
                                            state_dict=state_dict)
            # The instruction the model was trained with: prompting it any other way loses accuracy.
            (out / "prompt.json").write_text(json.dumps(
                {"instruction": self.instruction_text, "skeleton": self.recipe.data.prompt.skeleton},
                indent=2, ensure_ascii=False) + "\n")
            self._info(f"saved {'adapter' if self.plan.uses_lora else 'model'} to {out}")
        self.accelerator.wait_for_everyone()
        return out

    def _load_metrics(self) -> dict:
        path = self.run_dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_metrics(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    def _info(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"[finetune] {message}")
            log.info(message)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _tracker_kwargs(recipe: Recipe) -> dict:
    name = recipe.tracking.run_name or Path(recipe.output.dir).name
    return {"wandb": {"name": name}, "trackio": {"name": name}}
