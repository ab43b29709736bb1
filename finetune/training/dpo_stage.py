"""What a `kind: dpo` stage adds to the training loop: its pairs (built or read back when it starts), their loader's
dataset, the per-step normalisation of the preference loss, and the statistics it logs (finetune/training/dpo.py
has the loss, finetune/training/dpo_pairs.py the pairs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.config import DpoSection
from finetune.errors import UserError
from finetune.models.base import IGNORE_INDEX
from finetune.training.dpo import PreferenceDataset, PreferencePair, pair_step_losses
from finetune.training.dpo_pairs import (
    fill_reference,
    given_pairs,
    load_pairs,
    pairs_folder,
    save_pairs,
    self_pairs,
    summary_line,
)
from finetune.training.engine import zero_stage


@dataclass
class PreferenceStage:
    """A preference stage's pairs over its samples, and its loss settings."""

    settings: DpoSection
    pairs: list[PreferencePair]
    samples: list
    summary: dict
    stats: dict = field(default_factory=dict)  # sums since the last logged step

    def dataset(self, family, processor, instruction_text: str) -> PreferenceDataset:
        return PreferenceDataset(
            self.pairs, self.samples, family=family, processor=processor, instruction_text=instruction_text
        )

    def normalizers(self, micro: list[dict], accelerator) -> torch.Tensor:
        """[pairs, chosen answer tokens] of the whole optimizer step, over every process: a pair's loss is divided
        by the first, the optional NLL term by the second."""
        pairs = sum(b["ref_logps"].numel() // 2 for b in micro)
        chosen = sum(int((b["labels"][: b["labels"].shape[0] // 2] != IGNORE_INDEX).sum()) for b in micro)
        counts = torch.tensor([[pairs, chosen]], dtype=torch.float32, device=accelerator.device)
        return accelerator.gather(counts).sum(dim=0)

    def loss(self, model, family, batch: dict, normalizers: torch.Tensor) -> torch.Tensor:
        pair_losses, chosen_nll, stats = pair_step_losses(model, family, batch, self.settings)
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value
        loss = pair_losses / normalizers[0].to(pair_losses.device)
        if self.settings.sft_weight:
            loss = loss + self.settings.sft_weight * chosen_nll / normalizers[1].to(pair_losses.device)
        return loss

    def take_stats(self, accelerator) -> dict[str, float]:
        """Means since the last call, over every process: the implicit rewards of chosen and rejected answers,
        their margin, and the share of pairs the policy ranks right."""
        keys = ("pairs", "reward_chosen", "reward_rejected", "ranked_right")
        sums = torch.tensor([[self.stats.get(k, 0.0) for k in keys]], dtype=torch.float64, device=accelerator.device)
        total = dict(zip(keys, accelerator.reduce(sums, reduction="sum").squeeze(0).tolist(), strict=True))
        self.stats = {}
        n = max(total["pairs"], 1.0)
        chosen, rejected = total["reward_chosen"] / n, total["reward_rejected"] / n
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "rewards/accuracy": total["ranked_right"] / n,
        }


def start_preference_stage(job, index: int) -> PreferenceStage:
    """Stage `index`'s pairs: read back from the run folder (a resumed run), else built from the current model
    (`pairs: self`) or from data.preference, with their reference log-probabilities, and saved."""
    r, acc, stage = job.recipe, job.accelerator, job.stages[index]
    settings, samples = stage.preference, job.data.stage_samples[index].samples
    folder = pairs_folder(job.run_dir, index, stage.name)
    saved = load_pairs(folder)
    if saved is not None:
        pairs, summary = saved
        job._info(f"stage '{stage.name}': {len(pairs)} pairs read back from {folder}")
        return PreferenceStage(settings, pairs, samples, summary)
    if job.state.stage == index and job.state.stage_step > 0:
        raise UserError(
            f"{folder}: the pairs of stage '{stage.name}' are missing from the run folder; its checkpoints were "
            f"trained on them, so the stage cannot resume without them"
        )
    model = job.model
    if job.entered_stage is None and not getattr(model, "is_quantized", False):
        model.to(acc.device)  # a first stage: generation and the reference run before prepare() places it
    common = dict(family=job.family, processor=job.processor, instruction_text=job.instruction_text)
    if settings.pairs == "self":
        pairs, summary = self_pairs(
            model,
            samples,
            **common,
            accelerator=acc,
            settings=settings,
            batch_size=r.eval.batch_size,
            max_new_tokens=settings.max_new_tokens or r.eval.max_new_tokens,
            synced_ranks=zero_stage(acc) == 3 and acc.num_processes > 1,
            skeleton=r.data.prompt.skeleton,
        )
    else:
        pairs, summary = given_pairs(
            r.data.preference,
            samples,
            tokenizer=job.processor.tokenizer,
            family=job.family,
            processor=job.processor,
            skeleton=r.data.prompt.skeleton,
            max_length=r.data.max_length,
        )
    fill_reference(model, pairs, samples, **common, accelerator=acc, batch_size=r.train.batch_size)
    if acc.is_main_process:
        save_pairs(folder, pairs, samples, summary, job.processor.tokenizer)
        job.evaluator.metrics.setdefault("preference", {})[f"stage{index + 1}-{stage.name}"] = {
            k: v for k, v in summary.items() if k != "fields"
        }
    acc.wait_for_everyone()
    job._info(summary_line(stage.name, summary) + f" (saved in {folder})")
    return PreferenceStage(settings, pairs, samples, summary)


def stage_start_eval(job, index: int) -> tuple[str, dict] | None:
    """The evaluation a preference stage's changes are measured from: the one made at the stage's start (the
    previous stage's end, or `before`), else one made now on the subset its end evaluation will use."""
    if not job.eval_samples:
        return None
    tag = f"stage{index + 1}-{job.stages[index].name}-start"
    recorded = job.evaluator.metrics.setdefault("preference", {}).setdefault(tag.removesuffix("-start"), {})
    if "start" in recorded:
        return recorded["start"]["tag"], recorded["start"]
    previous = f"stage{index}-{job.stages[index - 1].name}" if index else None
    if previous in job.evaluator.metrics.get("stages", {}):
        tag, metrics = previous, job.evaluator.metrics["stages"][previous]
    elif index == 0 and "before" in job.evaluator.metrics and job.state.global_step == 0:
        tag, metrics = "before", job.evaluator.metrics["before"]
    else:
        e = job.recipe.eval
        subset = job.eval_samples[: e.during_training_samples] if e.during_training_samples else None
        metrics = job.evaluate(tag, subset, report=False)
    keep = ("num_samples", "per_field", "hallucinated_field_rate", "missed_field_rate", "field_f1")
    recorded["start"] = {"tag": tag, **{k: metrics[k] for k in keep if k in metrics}}
    job.evaluator.save()
    return tag, recorded["start"]
