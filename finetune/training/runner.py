"""The fine-tuning recipe: setup → evaluate base → train stage by stage → evaluate → save, on Accelerate.

Engine: our own loop on `accelerate.Accelerator` (device placement, DDP / DeepSpeed / FSDP, mixed precision,
no_sync, checkpoint state and trackers all come from Accelerate). Not transformers' Trainer, because a recipe
runs generated-JSON evaluation mid-training and several freezing stages with a fresh optimizer each in one
job — both fight Trainer's single optimizer / single eval-loss lifecycle.

Stages (finetune/training/stages.py): each stage sets which groups train, builds a new optimizer (one parameter
group per module group, at the stage's learning rates) and a new warmup + decay schedule, and re-prepares the
model with Accelerate, so DDP registers hooks only for what trains and DeepSpeed builds its engine for the new
trainable set. Frozen groups hold no optimizer state and, with no input needing a gradient, build no autograd
graph (nothing of theirs is kept for a backward pass, with or without gradient checkpointing).

Loss normalisation follows Accelerate's documented pattern for token-level losses: each optimizer step sums
the cross-entropy over all label tokens of its G micro-batches on all processes and divides by that global
count, so long and short answers weigh the same whatever the batching.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from finetune.config import Recipe, ResolvedRecipe
from finetune.errors import Interrupted
from finetune.models import get_family
from finetune.progress import Progress, info
from finetune.resolve import resolve_recipe, subgroup_specs
from finetune.training import stages as staging
from finetune.training.checkpoint import (
    TrainerState,
    check_checkpoint_weights,
    keep_trained_weights_only,
    list_checkpoints,
    prune_checkpoints,
    required_files,
    save_model,
    trained_so_far,
    write_checkpoint,
)
from finetune.training.cpu_memory import HeapTrimmer
from finetune.training.dpo_stage import PreferenceStage, stage_start_eval, start_preference_stage
from finetune.training.engine import (
    check_replicas_agree,
    decided_on_main,
    is_sharded,
    make_accelerator,
    run_info,
    zero_stage,
)
from finetune.training.interrupt import InterruptFlag
from finetune.training.loss import causal_lm_loss
from finetune.training.run_eval import RunEvaluator
from finetune.training.run_folder import check_run_dir, flatten, prepare_run_dir, record_recipe, trim_train_log
from finetune.training.run_lock import RunLock, describe_previous
from finetune.training.sampler import batch_stream
from finetune.training.step_log import StepLog, tracker_init_kwargs
from finetune.training.train_data import TrainData
from finetune.training.tuning import (
    TuningPlan,
    check_lora_targets,
    enable_gradient_checkpointing,
    inject_lora,
    prepare_quantized,
    quantization_for,
    set_trainable,
)

log = logging.getLogger("finetune")


class FineTuneRecipe:
    """One training job described by a recipe (resolved here, once, if it is not already)."""

    def __init__(self, recipe: Recipe | ResolvedRecipe):
        self.recipe: ResolvedRecipe = resolve_recipe(recipe)
        self.run_dir = Path(self.recipe.output.dir)
        self.state = TrainerState()
        self.entered_stage: int | None = None  # the stage the prepared model / optimizer belong to
        self.uses_lora = False
        self.interrupt = InterruptFlag()  # Ctrl-C: finish the step, save a checkpoint, stop
        self.run_lock: RunLock | None = None  # held by the main process from setup to the end of run
        # Built by setup():
        self.family = get_family(self.recipe.model.family, self.recipe.model.path, self.recipe.model.revision)
        self.accelerator: Accelerator | None = None
        self.processor = None
        self.data: TrainData | None = None
        self.instruction_text = ""
        self.train_samples: list = []
        self.eval_samples: list = []
        self.evaluator: RunEvaluator | None = None
        self.step_log: StepLog | None = None
        self.model: torch.nn.Module | None = None
        # Built by each stage (_enter_stage):
        self.plan: TuningPlan | None = None
        self.preference: PreferenceStage | None = None  # a `kind: dpo` stage's pairs and loss
        self.optimizer = self.scheduler = self.train_loader = None
        self.batches_per_epoch = self.stage_total = 0

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Build everything: accelerator, run folder (locked for the whole run), stages, data (validated,
        reported), model, first stage."""
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _processor_options(self, resume_from: Path | None) -> dict:
        """The recipe's processor options; a resumed run's with the prompt format its checkpoint records (a
        checkpoint from before formats were recorded: the family's legacy one), so its prompts do not change."""
        options = dict(self.recipe.model.processor)
        if resume_from is not None:
            recorded = TrainerState.load(resume_from).prompt_format
            options.update(self.family.legacy_prompt_format() if recorded is None else recorded)
        return options

    def close(self) -> None:
        """Give up the run folder's lock (the process's exit does it too)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _setup(self) -> None:
        r = self.recipe
        self.accelerator = make_accelerator(r, str(self.run_dir))
        self.family.check_engine(zero_stage(self.accelerator))
        # glibc keeps freed activations in its heap and a CPU run's memory climbs step after step (cpu_memory.py).
        self.heap = HeapTrimmer() if self.accelerator.device.type == "cpu" else None
        set_seed(r.train.seed)
        self._lock_run_dir()
        # Refuse now, and find the checkpoint a resume starts from; change the folder once all is checked.
        required = required_files(self.accelerator.num_processes, sharded=is_sharded(self.accelerator))
        folder_plan = decided_on_main(
            self.accelerator,
            lambda: check_run_dir(self.run_dir, r.output.if_exists, required=required, num_stages=len(self.stages)),
        )
        for line in folder_plan.warnings:
            self._info(f"warning: {line}")

        self.processor = self.family.load_processor(
            r.model.path, r.model.revision, **self._processor_options(folder_plan.resume_from)
        )
        self.state.prompt_format = self.family.prompt_format(self.processor)
        self.data = TrainData(r, self.family, self.processor)
        self.instruction_text = self.data.instruction_text
        self.train_samples, self.eval_samples = self.data.train_samples, self.data.eval_samples
        for report in self.data.reports:
            self._info(f"data {report.summary()}")
        for warning in self.data.warnings:
            self._info(f"warning: {warning}")

        quantization = quantization_for(r, self.family, self.accelerator)
        model = self.family.load_model(
            r.model.path,
            revision=r.model.revision,
            attn_implementation=r.model.attn_implementation,
            quantization=quantization,
        )
        if quantization is not None:
            model = prepare_quantized(model, quantization, r.tuning.quantization.skip, say=self._info)
        model.config.use_cache = False
        # Subgroups (the family's and the recipe's) become groups of their own, now that their modules are known.
        specs = subgroup_specs(r, tuple(self.family.group_prefixes), self.family.subgroups)
        self.family = self.family.with_subgroups(model, specs)
        if r.tuning.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        check_lora_targets(model, self.family, r.tuning.lora, staging.lora_groups_from(self.stages, 0))

        prepare_run_dir(self.run_dir, folder_plan, self.accelerator)
        resume_from = folder_plan.resume_from
        if self.accelerator.is_main_process:
            self.data.write_report(self.run_dir)
        record_recipe(
            r, self.run_dir, resumed=resume_from is not None, is_main_process=self.accelerator.is_main_process
        )
        self.evaluator = RunEvaluator(
            r,
            family=self.family,
            processor=self.processor,
            accelerator=self.accelerator,
            run_dir=self.run_dir,
            instruction_text=self.instruction_text,
            train_targets=[s.target for s in self.train_samples],
            eval_samples=self.eval_samples,
            model=model,
            info=self._info,
        )
        self.model = model
        self.step_log = StepLog(r, self.accelerator, self.run_dir)
        self.accelerator.register_save_state_pre_hook(self._keep_trained_weights_only)
        if r.tracking.report_to:
            self.accelerator.init_trackers(
                r.tracking.project, config=flatten(r.model_dump(mode="json")), init_kwargs=tracker_init_kwargs(r)
            )
        if resume_from:
            self._resume(resume_from)
        else:
            self._enter_stage(0)

    def _lock_run_dir(self) -> None:
        """The main process takes the run folder's lock; every process stops if another run holds it."""

        def take():
            self.run_lock = RunLock.acquire(self.run_dir)
            return describe_previous(self.run_lock)

        previous = decided_on_main(self.accelerator, take)
        if previous:
            self._info(f"warning: {previous}")

    # ------------------------------------------------------------------------------------------------ stages
    def _enter_stage(self, index: int) -> None:
        """Make stage `index` current: LoRA adapters if it is the first to ask, trainable flags, a new optimizer
        and schedule, and the model, optimizer and loader (re-)prepared by Accelerate."""
        r, acc, stage = self.recipe, self.accelerator, self.stages[index]
        # A preference stage's pairs come from the model as the stage starts: built (or read back) before the
        # previous stage's engine is released, since a sharded model can only generate through it.
        self.preference = self._preference_stage(index) if stage.preference is not None else None
        self.evaluator.since = None
        if self.preference is not None:
            self.evaluator.since = self._stage_start_eval(index)
        if self.preference is not None and not self.preference.pairs:
            self._info(f"stage {index + 1}/{len(self.stages)} '{stage.name}': no pairs to learn from; skipped")
            self.entered_stage, self.stage_total = index, 0
            return
        if self.entered_stage is not None:
            # The next prepare builds wrapper, engine, optimizer and loader for the new trainable set (a stale engine
            # would keep stepping old parameters).
            self._release_engine()
        model = self.model
        first_lora = staging.first_lora_stage(self.stages)
        # Adapters are created by the first stage that asks for them; under ZeRO-3 before the first stage
        # instead, because PEFT cannot wrap weights an earlier engine has partitioned (B = 0 keeps them inert).
        create_at = 0 if first_lora is not None and zero_stage(acc) == 3 else first_lora
        if not self.uses_lora and create_at is not None and index >= create_at:
            model = inject_lora(
                model,
                self.family,
                r.tuning.lora,
                staging.lora_groups_from(self.stages, first_lora),
                staging.full_groups(self.stages),
            )
            self.uses_lora = True
        self.plan: TuningPlan = set_trainable(
            model, self.family, stage.groups, uses_lora=self.uses_lora, lora_later=first_lora is not None
        )

        if self.preference is None:
            loader = self.data.loader(index)
        else:
            dataset = self.preference.dataset(self.family, self.processor, self.instruction_text)
            loader = self.data.pair_loader(index, dataset)
        # Batches per process and epoch as Accelerate will shard them (every process gets ceil(batches /
        # processes)), known before `prepare` because the schedule must be prepared in the same call as the
        # model: only then does DeepSpeed's checkpoint carry it.
        self.batches_per_epoch = math.ceil(len(loader) / acc.num_processes)
        main_batches = math.ceil(self.data.main_batches / acc.num_processes)
        optimizer, scheduler, self.stage_total, warmup = staging.optimizer_and_schedule(
            model,
            self.family,
            self.stages,
            index,
            r,
            batches_per_epoch=self.batches_per_epoch,
            main_batches_per_epoch=main_batches,
        )
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if len(self.train_loader) != self.batches_per_epoch:
            raise RuntimeError(
                f"Accelerate sharded {len(loader)} batches into {len(self.train_loader)} per "
                f"process, expected {self.batches_per_epoch}"
            )
        self.entered_stage = index

        epochs = self.stage_total * r.train.grad_accum / self.batches_per_epoch
        budget = r.train.max_tokens_per_batch
        unit = "samples" if self.preference is None else "pairs"
        batch = f"≤ {budget:,} tokens (≤ {r.train.batch_size} {unit})" if budget else f"{r.train.batch_size} {unit}"
        lrs = ", ".join(f"{g} {lr:g}" for g, lr in stage.lr.items())
        self._info(
            f"stage {index + 1}/{len(self.stages)} '{stage.name}': {self.stage_total} optimizer steps of "
            f"{r.train.grad_accum} × {batch} × {acc.num_processes} processes = "
            f"{epochs:.2f} epochs of its {len(loader.dataset)} {unit}; "
            f"lr {lrs}; warmup {warmup}"
        )
        self._info(f"stage '{stage.name}' parameters: {self.plan.summary()}")

    def _preference_stage(self, index: int) -> PreferenceStage:
        return start_preference_stage(self, index)

    def _stage_start_eval(self, index: int) -> tuple[str, dict] | None:
        return stage_start_eval(self, index)

    # ------------------------------------------------------------------------------------------------- train
    def run(self) -> dict:
        """Evaluate the base model, train every stage, evaluate again, save; returns the metrics. Ctrl-C while
        training saves a checkpoint and raises `Interrupted` with the command that resumes."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        metrics, started = self.metrics, time.time()
        # The base model's score: never a resumed run's (its model has trained; an outdated `before` stays outdated).
        fresh = self.state.global_step == 0
        if self.recipe.eval.before_training and "before" not in metrics and self.eval_samples and fresh:
            metrics["before"] = self.evaluate("before")
            self.evaluator.save()
        self.interrupt.announce = self.accelerator.is_main_process
        with self.interrupt.catching():
            self.train()
        self.save_final()
        if self.recipe.eval.after_training and self.eval_samples:
            metrics["after"] = self.evaluate("after")
            self.evaluator.save()
        self._release_engine()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:  # for the model card: how and on what it was trained
            (self.run_dir / "run_info.json").write_text(
                json.dumps(
                    run_info(self.accelerator, seconds=time.time() - started, steps=self.state.global_step), indent=2
                )
                + "\n"
            )
        self._info(self._summary(metrics))
        return metrics

    def _release_engine(self) -> None:
        """Drop DDP's wrapper (or DeepSpeed's engine), the optimizer, schedule and loader; `self.model` becomes the
        bare model. Between stages, so the next stage prepares its own; at the end, before the process group is
        destroyed: DDP's reducer holds the group, and left to the interpreter's exit gloo's worker threads were torn
        down with it, so a rank could die of `terminate called without an active exception` after a finished run."""
        self.model = self.accelerator.unwrap_model(self.model)
        self.optimizer = self.scheduler = self.train_loader = None
        self.accelerator.free_memory()  # forgets what prepare() returned, then collects

    @property
    def stages(self):
        """The stages this run runs (the resolved recipe's; nothing keeps a copy)."""
        return self.recipe.stages

    @property
    def metrics(self) -> dict:
        return self.evaluator.metrics

    def evaluate(self, tag: str, samples=None, *, report: bool = True) -> dict:
        """Generate-and-score the current model on the eval split (or `samples`), recorded under `tag`."""
        return self.evaluator.evaluate(self.model, tag, self.state.global_step, samples, report=report)

    def _evaluate_during(self, tag: str) -> dict:
        stage = self.stages[self.state.stage].name
        return self.evaluator.evaluate_during(self.model, tag, self.state.global_step, stage, self.save_final)

    def _summary(self, metrics: dict) -> str:
        def em(tag: str) -> str:
            return f"{metrics[tag]['json_exact_match']:.1%}" if tag in metrics else "n/a"

        what = "adapter" if self.uses_lora else "model"
        best = metrics.get("best")
        best_text = (
            f"; best {best['metric']} {best['value']:.3f} at step {best['step']} in {self.run_dir / 'best'}"
            if best
            else ""
        )
        return (
            f"done: JSON exact match on {self.recipe.eval.split} {em('before')} before -> {em('after')} after; "
            f"{what} in {self.run_dir / 'final'}{best_text}, metrics and predictions in {self.run_dir}"
        )

    def train(self, on_stage_end=None) -> None:
        """Every stage in order from where the state says. A stage's end may evaluate (not the last stage's,
        which is the run's `after` evaluation); `on_stage_end(job, stage_index)` is called after each stage
        (tests use it to look at the weights between stages)."""
        while True:
            index = self.state.stage
            if self.entered_stage != index:
                self._enter_stage(index)
            self._train_stage()
            if on_stage_end is not None:
                on_stage_end(self, index)
            stage = self.stages[index]
            if index == len(self.stages) - 1:
                # The final weights compete for best/ too, whenever evaluations during training happen.
                if (
                    self.eval_samples
                    and (self.recipe.eval.every_steps or len(self.stages) > 1)
                    and self.evaluator.last_during_step() != self.state.global_step
                ):
                    self._evaluate_during(f"step{self.state.global_step}")
                break
            tag = f"stage{index + 1}-{stage.name}"
            ran = self.stage_total > 0  # a preference stage without pairs is skipped: nothing to evaluate
            if ran and stage.eval_at_end and self.eval_samples and tag not in self.metrics.get("stages", {}):
                self.metrics.setdefault("stages", {})[tag] = self._evaluate_during(tag)
            self.state.stage, self.state.stage_step, self.state.epoch, self.state.batches_in_epoch = index + 1, 0, 0, 0
        self._check_replicas_agree()

    def _train_stage(self) -> None:
        """Optimizer steps until the stage's budget; its data stream runs across epoch boundaries."""
        r, acc = self.recipe, self.accelerator
        G = r.train.grad_accum
        stage = self.stages[self.state.stage]
        batches = batch_stream(self.train_loader, self.accelerator, self.state, self.batches_per_epoch)
        self.model.train()
        bar = Progress(
            self.stage_total,
            initial=self.state.stage_step,
            disable=not acc.is_main_process,
            desc=f"stage {self.state.stage + 1}/{len(self.stages)} {stage.name}",
            unit="step",
        )
        self.step_log.start_stage()
        preference = self.preference
        while self.state.stage_step < self.stage_total:
            micro = [next(batches) for _ in range(G)]
            if preference is None:
                label_tokens = sum((b["labels"] != -100).sum() for b in micro)
                global_label_tokens = acc.gather(label_tokens.reshape(1).to(acc.device)).sum()
            else:  # pairs (and chosen tokens) of the whole step: the preference loss's denominators
                normalizers = preference.normalizers(micro, acc)
            step_loss = torch.zeros((), device=acc.device)
            for batch in micro:
                batch.pop("index")
                # Accelerate counts the micro-batches: the G-th syncs gradients across processes (DDP: no_sync
                # before it) and is the only one after which DeepSpeed's engine steps.
                with acc.accumulate(self.model):
                    if preference is None:
                        loss = causal_lm_loss(self.model, self.family.training_inputs(batch), global_label_tokens)
                    else:
                        loss = preference.loss(self.model, self.family, batch, normalizers)
                    # ×G cancels Accelerate's (or DeepSpeed's) division by the accumulation steps; ×processes
                    # cancels the gradient averaging across ranks: together the gradient is that of
                    # sum(CE) / all label tokens of the step.
                    acc.backward(loss * G * acc.num_processes)
                step_loss += loss.detach()
                self.step_log.add(batch)
            if r.optim.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), r.optim.max_grad_norm)  # DeepSpeed: its own config
            self.optimizer.step()
            # The rates this step used: read before the scheduler moves them on to the next step's.
            lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1
            self.state.stage_step += 1
            if self.heap is not None:
                self.heap.after_step()

            loss = acc.reduce(step_loss, reduction="sum").item()  # per-rank partial sums → the global mean
            self.step_log.step(
                bar,
                self.state,
                stage,
                self.stage_total,
                loss,
                lrs,
                preference=preference,
                best=self.evaluator.last_value,
            )
            every = r.eval.every_steps
            if every and self.eval_samples and self.state.global_step % every == 0:
                self._evaluate_during(f"step{self.state.global_step}")
            every = r.train.checkpoint_every
            saved = every and (self.state.global_step % every == 0 or self.state.stage_step == self.stage_total)
            if saved:
                self.save_checkpoint()
            if self.interrupt.agreed(acc):
                bar.close()
                self._stop_interrupted(already_saved=bool(saved))
        bar.close()

    def _check_replicas_agree(self) -> None:
        digest = check_replicas_agree(self.accelerator, self.model)
        if digest:
            self._info(
                f"trainable weights identical on all {self.accelerator.num_processes} processes (sha256 {digest})"
            )

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """A resumable checkpoint: trained weights, optimizer, scheduler, RNG, stage and data position."""
        path = self.run_dir / "checkpoints" / f"step_{self.state.global_step:06d}"
        previous = list_checkpoints(self.run_dir)
        write_checkpoint(self.accelerator, path, self.state, previous[-1] if previous else None)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.run_dir, keep=self.recipe.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def _trained_so_far(self, name: str) -> bool:
        return trained_so_far(name, self.family, self.stages[: self.state.stage + 1])

    def _keep_trained_weights_only(self, models, weights, output_dir) -> None:
        keep_trained_weights_only(weights, self._trained_so_far)

    def _resume(self, checkpoint: Path) -> None:
        """Rebuild the checkpoint's stage (adapters, trainable set, optimizer shapes), then load its state."""
        self.state = TrainerState.load(checkpoint)
        self.state.prompt_format = self.family.prompt_format(self.processor)  # as loaded: the recorded or legacy one
        self.evaluator.forget_after(self.state.global_step)
        if self.accelerator.is_main_process:
            trim_train_log(self.run_dir, self.state.global_step)
        self._enter_stage(self.state.stage)
        # Non-strict: our checkpoints hold only the weights that trained (checked just after); DeepSpeed's own
        # checkpoints hold every weight and take their strictness flag under another name.
        strict = {"load_module_strict": False} if zero_stage(self.accelerator) is not None else {"strict": False}
        self.accelerator.load_state(str(checkpoint), **strict)
        if not is_sharded(self.accelerator):  # sharded engines check their own files
            check_checkpoint_weights(checkpoint, self.accelerator.unwrap_model(self.model), self._trained_so_far)
        stage = self.stages[self.state.stage]
        self._info(
            f"resumed from {checkpoint} at step {self.state.global_step}: stage {self.state.stage + 1} "
            f"'{stage.name}' step {self.state.stage_step}/{self.stage_total} "
            f"(epoch {self.state.epoch}, batch {self.state.batches_in_epoch})"
        )

    # ------------------------------------------------------------------------------------------------- save
    def save_final(self, out: Path | None = None) -> Path:
        """`final/` (or `out`): the adapter (LoRA runs) or the whole model, with processor, tokenizer, chat
        template and prompt.json."""
        out = out or self.run_dir / "final"
        prompt = {"instruction": self.instruction_text, "skeleton": self.recipe.data.prompt.skeleton}
        if self.evaluator is not None:  # the answer schema and decoding bounds, for eval / predict --constrained
            prompt["answer"] = self.evaluator.answer()
        save_model(
            self.accelerator,
            self.model,
            out,
            family=self.family,
            processor=self.processor,
            adapter=self.uses_lora,
            source_path=self.recipe.model.path,
            prompt=prompt,
            remote_code=self.recipe.model.trust_remote_code,
        )
        self._info(f"saved {'adapter' if self.uses_lora else 'model'} to {out}")
        return out

    def _stop_interrupted(self, *, already_saved: bool) -> None:
        """After Ctrl-C: the step that was running has finished; save it and stop with the resume command."""
        path = self.run_dir / "checkpoints" / f"step_{self.state.global_step:06d}"
        if not already_saved:
            path = self.save_checkpoint()
        raise Interrupted(
            f"interrupted at step {self.state.global_step} (stage '{self.stages[self.state.stage].name}'); "
            f"checkpoint saved to {path}; resume with the same command and output.if_exists=resume"
        )

    def _info(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            info(message)
            log.debug(message)
