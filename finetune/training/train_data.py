"""The data a run trains and evaluates on: validated samples per split and per stage, and their loaders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.config import ResolvedRecipe, StageSection
from finetune.data.dataset import Collator, DataReport, DocumentDataset, Sample, _sample_key, prepare_samples
from finetune.data.prompt import render_instruction
from finetune.errors import UserError
from finetune.models.base import ModelFamily
from finetune.training.sampler import EpochLengthGroupedSampler, MixtureSampler, TokenBudgetBatchSampler


@dataclass
class StageSamples:
    """A stage's training samples: one source, or a mix (sources concatenated, drawn by weight)."""

    samples: list[Sample]
    source_sizes: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    samples_per_epoch: int | None = None

    @property
    def is_mix(self) -> bool:
        return bool(self.weights)


class TrainData:
    """Reads, validates and reports every split a recipe names (stage data included) before step 1."""

    def __init__(self, recipe: ResolvedRecipe, family: ModelFamily, processor):
        self.recipe, self.family, self.processor = recipe, family, processor
        d = recipe.data
        stages = recipe.stages
        self.instruction_text = render_instruction(d.prompt.instruction, d.prompt.skeleton)
        self.reports: list[DataReport] = []
        self._prepared: dict[str, list[Sample]] = {}

        self.train_samples = self._samples(d.train, "train", limit=d.max_train_samples)
        if not self.train_samples:
            raise UserError(f"data.train: no usable samples ({self.reports[0].summary()})")
        eval_source = getattr(d, recipe.eval.split)
        self.eval_samples = (
            self._samples(eval_source, recipe.eval.split, limit=recipe.eval.max_samples)
            if eval_source is not None
            else []
        )
        # A preference stage's pairs (`pairs: preference`): the records read with `chosen` as their target.
        self.preference_samples = (
            self._samples(d.preference, "preference", target_column="chosen") if d.preference is not None else []
        )
        self.stage_samples = [self._stage_samples(i, stage) for i, stage in enumerate(stages)]
        self.main_batches = self.batches_per_epoch(self.train_samples)
        if recipe.train.max_tokens_per_batch:  # every stage's batches checked now, not when the stage begins
            for i, part in enumerate(self.stage_samples):
                if part.is_mix:
                    raise UserError(
                        f"{recipe.where('train.max_tokens_per_batch')}: train.max_tokens_per_batch does not apply "
                        f"to a stage's data.mix (stages.{i}, {stages[i].name}): batch a mix by train.batch_size"
                    )
                self._check_budget(part.samples)
        self.warnings = [
            f"stages.{i} ({stage.name}) trains on {source}, the {recipe.eval.split} split: its "
            f"evaluations will overstate the model"
            for i, stage in enumerate(stages)
            for source in _stage_sources(stage)
            if eval_source is not None and _same_source(source, eval_source)
        ]
        self.warnings += [line for rep in self.reports if (line := rep.duplicates_warning()) is not None]
        # Only the training targets refine the answer schema (RunEvaluator): a key missing there becomes optional.
        self.warnings += [
            line for rep in self.reports if (line := rep.fields_warning(shapes_schema=rep.split == "train"))
        ]
        self.overlap = self._overlap_with_train()
        self.warnings += [line for split, o in self.overlap.items() if (line := _overlap_warning(split, o))]

    def _overlap_with_train(self) -> dict[str, dict]:
        """Per eval split named (val, test): whether it is data.train's file (or a stage's training source), and
        (for the split this run reads) how many of its kept samples have the same images and target as a sample
        any stage trains on."""
        d, split_read = self.recipe.data, self.recipe.eval.split
        first_in_train: dict[tuple, str] = {}
        trained_on = [self.train_samples, *(part.samples for part in self.stage_samples)]
        for s in (s for samples in trained_on for s in samples):
            first_in_train.setdefault(_sample_key(s.images, s.target), s.origin)
        overlap = {}
        for split in ("val", "test"):
            source = getattr(d, split)
            if source is None:
                continue
            train_sources = [("data.train", d.train)] + [
                (f"stages.{i}.data", src) for i, stage in enumerate(self.recipe.stages) for src in _stage_sources(stage)
            ]
            same_as = next((name for name, t in train_sources if _same_source(t, source)), None)
            entry: dict = {"source": str(source), "same_file": same_as is not None}
            if same_as is not None:
                entry["same_as"] = same_as
            if split == split_read:
                shared = [
                    f"{s.origin} = {first_in_train[key]}"
                    for s in self.eval_samples
                    if (key := _sample_key(s.images, s.target)) in first_in_train
                ]
                entry.update(samples=len(self.eval_samples), shared=len(shared), first_shared=shared[:3])
            overlap[split] = entry
        return overlap

    def _samples(
        self, source: str, split: str, limit: int | None = None, target_column: str | None = None
    ) -> list[Sample]:
        key = f"{source}|{limit}|{target_column}"
        if key not in self._prepared:
            d = self.recipe.data
            samples, report = prepare_samples(
                source,
                split=split,
                limit=limit,
                family=self.family,
                processor=self.processor,
                instruction_text=self.instruction_text,
                skeleton=d.prompt.skeleton,
                max_length=d.max_length,
                on_bad_sample=d.on_bad_sample,
                image_column=d.image_column,
                target_column=target_column or d.target_column,
                max_image_pixels=d.max_image_pixels,
                pdf_dpi=d.pdf_dpi,
                max_pdf_pages=d.max_pdf_pages,
            )
            if not samples:
                raise UserError(f"{split} ({source}): no usable samples ({report.summary()})")
            self._prepared[key] = samples
            self.reports.append(report)
        return self._prepared[key]

    def _stage_samples(self, index: int, stage: StageSection) -> StageSamples:
        data = stage.data
        if stage.preference is not None and stage.preference.pairs == "preference":
            return StageSamples(self.preference_samples)
        if data is None:
            return StageSamples(self.train_samples)
        if data.train is not None:
            return StageSamples(self._samples(data.train, f"stages.{index}.data.train"))
        parts = [self._samples(m.source, f"stages.{index}.data.mix.{j}") for j, m in enumerate(data.mix)]
        return StageSamples(
            [s for part in parts for s in part],
            source_sizes=[len(p) for p in parts],
            weights=[m.weight for m in data.mix],
            samples_per_epoch=data.samples_per_epoch or sum(len(p) for p in parts),
        )

    def write_report(self, run_dir: Path) -> None:
        (run_dir / "data_report.json").write_text(
            json.dumps(
                {
                    rep.split: {
                        "read": rep.read,
                        "kept": rep.kept,
                        "skipped": dict(rep.skipped),
                        "first_skipped_at": rep.examples,
                        "duplicates": rep.duplicates,
                        "first_duplicates": rep.duplicate_examples,
                        "fields": rep.fields,
                    }
                    for rep in self.reports
                }
                | {"overlap_with_train": self.overlap},
                indent=2,
            )
            + "\n"
        )

    def loader(self, stage_index: int) -> torch.utils.data.DataLoader:
        """A stage's training loader: deterministic per (seed, stage, epoch), length-grouped when asked."""
        t = self.recipe.train
        part = self.stage_samples[stage_index]
        dataset = DocumentDataset(
            part.samples, family=self.family, processor=self.processor, instruction_text=self.instruction_text
        )
        seed = t.seed + 1_000_003 * stage_index  # stage 0 keeps the plain seed: a one-stage run is unchanged
        if part.is_mix:
            sampler = MixtureSampler(
                dataset.lengths,
                part.source_sizes,
                part.weights,
                samples_per_epoch=part.samples_per_epoch,
                batch_size=t.batch_size,
                seed=seed,
                group_by_length=t.group_by_length,
            )
        elif t.max_tokens_per_batch:
            return torch.utils.data.DataLoader(
                dataset, batch_sampler=self.token_budget_batches(part.samples, seed), **self._loader_options(seed)
            )
        else:
            sampler = EpochLengthGroupedSampler(
                dataset.lengths, batch_size=t.batch_size, seed=seed, group_by_length=t.group_by_length
            )
        return torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, sampler=sampler, **self._loader_options(seed)
        )

    def pair_loader(self, stage_index: int, dataset) -> torch.utils.data.DataLoader:
        """A preference stage's loader over its pairs (`dataset`: finetune.training.dpo.PreferenceDataset): batches
        of `train.batch_size` pairs (2 rows each), or filled up to `train.max_tokens_per_batch` with a pair counted
        as its two padded rows; deterministic per (seed, stage, epoch) like every stage's."""
        from finetune.training.dpo import PreferenceCollator

        t = self.recipe.train
        seed = t.seed + 1_000_003 * stage_index
        options = self._loader_options(seed)
        options["collate_fn"] = PreferenceCollator(options["collate_fn"])
        lengths = dataset.lengths
        if t.max_tokens_per_batch:
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[longest] > t.max_tokens_per_batch:
                origin = dataset.samples[dataset.pairs[longest].sample].origin
                raise UserError(
                    f"{self.recipe.where('train.max_tokens_per_batch')}: train.max_tokens_per_batch "
                    f"{t.max_tokens_per_batch} is less than the {lengths[longest]} tokens of a pair of {origin} (its "
                    f"two answers, padded alike); raise it"
                )
            batches = TokenBudgetBatchSampler(
                lengths,
                max_tokens=t.max_tokens_per_batch,
                max_samples=t.batch_size,
                seed=seed,
                group_by_length=t.group_by_length,
            )
            return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **options)
        sampler = EpochLengthGroupedSampler(
            lengths, batch_size=t.batch_size, seed=seed, group_by_length=t.group_by_length
        )
        return torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, **options)

    def _loader_options(self, seed: int) -> dict:
        return dict(
            num_workers=self.recipe.train.num_workers,
            # Its own generator: starting an iterator draws a seed from it, and drawing from the global RNG
            # instead would shift dropout masks between a resumed and an uninterrupted run.
            generator=torch.Generator().manual_seed(seed),
            collate_fn=Collator(self.family, self.processor.tokenizer.pad_token_id, padding_side="right"),
        )

    def batches_per_epoch(self, samples: list[Sample]) -> int:
        """Batches an epoch of `samples` makes on one process (before Accelerate shards them)."""
        t = self.recipe.train
        if t.max_tokens_per_batch:
            return len(self.token_budget_batches(samples, t.seed))
        return -(-len(samples) // t.batch_size)

    def _check_budget(self, samples: list[Sample]) -> None:
        """A sample longer than `train.max_tokens_per_batch` is one line naming it (it could never be batched: lower
        data.max_length or raise the budget)."""
        t = self.recipe.train
        longest = max(samples, key=lambda sample: sample.length)
        if longest.length > t.max_tokens_per_batch:
            raise UserError(
                f"{self.recipe.where('train.max_tokens_per_batch')}: train.max_tokens_per_batch "
                f"{t.max_tokens_per_batch} is less than the {longest.length} tokens of {longest.origin}; raise it "
                f"(or lower data.max_length to drop such samples)"
            )

    def token_budget_batches(self, samples: list[Sample], seed: int) -> TokenBudgetBatchSampler:
        """`train.max_tokens_per_batch` batches of `samples` (checked by `_check_budget`)."""
        t = self.recipe.train
        self._check_budget(samples)
        return TokenBudgetBatchSampler(
            [sample.length for sample in samples],
            max_tokens=t.max_tokens_per_batch,
            max_samples=t.batch_size,
            seed=seed,
            group_by_length=t.group_by_length,
        )


def _same_source(a: str, b: str) -> bool:
    """True if two data sources are the same file or folder (a hub dataset id: the same id); a format mapping
    (finetune.data.formats) by the folder or file it reads."""
    from finetune.data.formats import source_location

    a, b = source_location(a), source_location(b)
    if str(a).startswith("hf:") or str(b).startswith("hf:"):
        return str(a) == str(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _overlap_warning(split: str, o: dict) -> str | None:
    overstate = f"scores on {split} overstate what the model learned"
    if o["same_file"]:
        return f"data.{split} ({o['source']}) is the same file as {o.get('same_as', 'data.train')}: {overstate}"
    if not o.get("shared"):
        return None
    more = ", ..." if o["shared"] > len(o["first_shared"]) else ""
    return (
        f"{split} shares {o['shared']} of {o['samples']} samples with train (same images and target): "
        f"{', '.join(o['first_shared'])}{more}; {overstate}"
    )


def _stage_sources(stage: StageSection) -> list[str]:
    if stage.data is None:
        return []
    return [stage.data.train] if stage.data.train is not None else [m.source for m in stage.data.mix]
