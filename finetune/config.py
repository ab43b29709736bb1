"""Typed recipe schema.

A recipe is a YAML file validated into :class:`Recipe` at load time. Every section forbids unknown keys, so a
typo fails before a model is built (see :mod:`finetune.recipe` for the error formatting with "did you mean").

Recipes are immutable: sections are frozen and their mappings and lists are read-only, so what a run folder's
`recipe.yaml` records is what ran. :func:`finetune.resolve.resolve_recipe` turns a `Recipe` into a
:class:`ResolvedRecipe` (stages expanded, learning rates filled in, prompt skeleton derived) once, before
anything is built; changing a setting means building a new object (`model_copy(update=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)

GroupMode = Literal["frozen", "full", "lora"]
Precision = Literal["fp32", "bf16", "fp16"]
Tracker = Literal["tensorboard", "wandb", "trackio"]


class FrozenDict(dict):
    """A dict that refuses changes (a recipe's mappings: groups, learning rates, the skeleton, ...). Still a dict
    for reading, `json.dumps` and pydantic's serialisation."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a recipe is immutable: build a new one (model_copy(update=...)) instead of editing it")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):  # copy / deepcopy / pickle rebuild it from a plain dict
        return (FrozenDict, (dict(self),))


class FrozenList(list):
    """A list that refuses changes (see :class:`FrozenDict`)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a recipe is immutable: build a new one (model_copy(update=...)) instead of editing it")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = clear = extend = insert = pop = remove = _refuse
    reverse = sort = _refuse

    def __reduce__(self):
        return (FrozenList, (list(self),))


def freeze(value: Any) -> Any:
    """Mappings and lists, at any depth, as their read-only versions."""
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


Frozen = AfterValidator(freeze)


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors; values are type-checked (pydantic's default
    coercion: "3" is accepted for an int, "abc" is not); fields cannot be reassigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Origin:
    """Where a recipe came from: its file and the YAML line (or command-line override) of each key path, so a
    problem found at any point of loading or resolving names the place to fix."""

    source: str = "<recipe>"
    lines: dict[str, int | str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """`file:line`, `file (override k=v)` or `file`, for the nearest key at or above `key` with a place."""
        parts = key.split(".")
        while parts:
            place = self.lines.get(".".join(parts))
            if isinstance(place, str):
                return f"{self.source} ({place})"
            if place:
                return f"{self.source}:{place}"
            parts.pop()
        return self.source


class ModelSection(Section):
    family: str = Field(description="Model family module under finetune/models (e.g. llava_onevision).")
    path: str = Field(description="Hub id or local folder of the checkpoint.")
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Family-specific processor options, checked by the family (mississippi: max_tiles_per_image, use_msac, ...).
    processor: Annotated[dict[str, Any], Frozen] = Field(default_factory=FrozenDict)
    # Whether saved models (final/, best/, merges) and publish folders keep the source checkpoint's remote code: its
    # `*.py` files and the `auto_map` of config.json, tokenizer and processor configs. The toolkit never runs remote
    # code (every family loads natively), so this only governs what is saved and published; off (the default), a
    # model card's serve command has no --trust-remote-code.
    trust_remote_code: bool = False


class LoraSection(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # One dropout mask for the adapters that read the same input (q/k/v, gate/up): the same dropout rate per adapter,
    # fewer random masks to draw and keep (finetune/training/lora_dropout.py). false: PEFT's mask per adapter.
    shared_dropout: bool = True
    # Leaf module names per module group, e.g. {"llm": ["q_proj", "v_proj"]}. A group that is in `lora` mode and
    # absent here uses the family's default targets. Names are scoped to the group (never a bare global list,
    # which would also wrap the vision tower's identically named layers).
    targets: Annotated[dict[str, list[str]], Frozen] = Field(default_factory=FrozenDict)


DEFAULT_GROUPS = {"vision": "frozen", "projector": "frozen", "llm": "lora"}


class SubgroupSection(Section):
    # A group carved out of a family group: the modules named here (full module paths, e.g.
    # "visual_tokenizer.backbone.encoder.layers.-1"; a negative number counts from the end of a module list, so the
    # same recipe fits every depth) leave group `of` and form their own group. Stages and tuning.groups may give it a
    # mode and a learning rate of its own; where they do not, it has its parent's.
    of: str
    modules: Annotated[list[str], Frozen] = Field(min_length=1)


class QuantizationSection(Section):
    """QLoRA: the frozen base loaded quantised by bitsandbytes (finetune/models/quantization.py); LoRA trains on top.
    `skip` names groups kept unquantised (e.g. a vision tower that trains, or whose accuracy matters most)."""

    bits: Literal[4, 8]
    skip: Annotated[list[str], Frozen] = Field(default_factory=list)
    # 4-bit only: NF4 with double quantisation (the QLoRA paper's choice) and the dtype the 4-bit matmuls run in.
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class TuningSection(Section):
    # Mode per module group for a one-stage recipe. Groups a family has but the recipe omits are an error
    # (nothing implicit). None: {vision: frozen, projector: frozen, llm: lora}, unless `stages` / `schedule`
    # give the modes (then setting it too is an error).
    groups: Annotated[dict[str, GroupMode], Frozen] | None = Field(
        None, json_schema_extra={"override_seed": DEFAULT_GROUPS}
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    gradient_checkpointing: bool = False
    # Groups carved out of the family's (see SubgroupSection), by name, beside those the family defines itself
    # (e.g. Ovis's `vision_last_block`, which its paper schedule trains).
    subgroups: Annotated[dict[str, SubgroupSection], Frozen] = Field(default_factory=dict)
    # None: the base in the weights' own precision. Otherwise the frozen base quantised (QLoRA).
    quantization: QuantizationSection | None = None


class PromptSection(Section):
    instruction: str = "Extract the details from the document image and structure them into JSON format:"
    # JSON skeleton shown after the instruction. None: derived from the training targets (union of their keys).
    skeleton: Annotated[dict, Frozen] | None = None


DATA_FORMATS = ("jsonl", "imagefolder", "hf", "donut", "sroie", "funsd")


class DataColumns(Section):
    """Which columns (fields) hold the images and the target; None: the format's default."""

    image: str | None = None
    target: str | None = None


class DataSource(Section):
    """A data source in a published layout (finetune/data/formats.py): `{format: sroie, path: data/sroie,
    split: train}`. Written as a plain string instead, a source is read as before (JSONL, dataset folder,
    imagefolder or `hf:org/name[:split]`)."""

    format: Literal["jsonl", "imagefolder", "hf", "donut", "sroie", "funsd"]
    path: str = Field(min_length=1)
    # A subfolder for the folder formats (donut, sroie, imagefolder; funsd: train / test → training_data /
    # testing_data); the dataset split for hf (default train) and a donut Hub / saved dataset.
    split: str | None = None
    columns: DataColumns | None = None

    @model_validator(mode="after")
    def _split_applies(self):
        if self.split is not None and self.format == "jsonl":
            raise ValueError("split does not apply to format jsonl (name the file in path)")
        if self.columns is not None and self.format in ("sroie", "funsd"):
            raise ValueError(f"columns do not apply to format {self.format} (its layout fixes them)")
        return self

    def __str__(self) -> str:
        extra = f", split {self.split}" if self.split else ""
        if self.columns is not None:
            extra += f", columns {self.columns.image or '-'}/{self.columns.target or '-'}"
        return f"{self.path} ({self.format}{extra})"


def _source_kind(value: Any) -> str:
    return "mapping" if isinstance(value, (dict, DataSource)) else "str"


# A data source: a string as before, or a mapping with a format (DataSource). The tags name the union's members in
# pydantic's error locations ("str", "mapping"); finetune.recipe drops them from the key path it reports.
SourceSpec = Annotated[Annotated[str, Tag("str")] | Annotated[DataSource, Tag("mapping")], Discriminator(_source_kind)]


class DataSection(Section):
    train: SourceSpec = Field(
        description=(
            "JSONL file, Hugging Face dataset folder / imagefolder, or hub dataset id; or a mapping "
            "{format: donut | sroie | funsd | jsonl | imagefolder | hf, path: ..., split: ..., columns: ...}."
        )
    )
    val: SourceSpec | None = None
    test: SourceSpec | None = None
    image_column: str = "image"
    target_column: str = "target"
    prompt: PromptSection = Field(default_factory=PromptSection)
    # Preference pairs for a `kind: dpo` stage with `pairs: preference`: JSONL records {image, chosen, rejected}
    # (chosen: the JSON answer to prefer; rejected: a JSON object or the text of an answer to avoid).
    preference: SourceSpec | None = None
    max_length: int = Field(2048, gt=0, description="Samples longer than this are dropped and counted.")
    on_bad_sample: Literal["error", "skip"] = "error"
    max_train_samples: int | None = Field(None, gt=0)
    max_image_pixels: int = Field(
        89_478_485,  # PIL's default Image.MAX_IMAGE_PIXELS (finetune.data.dataset.DEFAULT_MAX_IMAGE_PIXELS)
        gt=0,
        description=(
            "An image with more pixels (width × height, read from its header before decoding) is a bad sample "
            "(on_bad_sample says whether that stops the run or skips it): decompression bombs and absurd scans are "
            "refused before they fill memory. This limit applies, not PIL's process-wide Image.MAX_IMAGE_PIXELS."
        ),
    )
    pdf_dpi: float = Field(
        144,  # finetune.data.pdf.DEFAULT_PDF_DPI
        gt=0,
        le=1200,
        description=(
            "A PDF given as an image is rendered page by page at this resolution (A4 at 144 dpi: 1191×1684 px, "
            "about a 150 dpi scan); each page is one image of the sample's prompt, in page order."
        ),
    )
    max_pdf_pages: int = Field(
        8,  # finetune.data.pdf.DEFAULT_MAX_PDF_PAGES
        gt=0,
        description=(
            "A PDF with more pages is a bad sample (on_bad_sample: stop or skip), never truncated: every page "
            "is an image in the prompt, and a long document would dwarf max_length."
        ),
    )


class OptimSection(Section):
    # One learning rate for every trainable group, or one per group name.
    lr: float | Annotated[dict[str, float], Frozen] = 1e-4
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0)

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value):
        values = value.values() if isinstance(value, dict) else [value]
        if any(v <= 0 for v in values):
            raise ValueError("learning rates must be > 0")
        return value


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(1, gt=0, description="Per process.")
    # Batches filled up to this many tokens (padding and image tokens included) instead of `batch_size` samples;
    # `batch_size` is then the most samples a batch may hold (finetune/training/sampler.py, TokenBudgetBatchSampler).
    max_tokens_per_batch: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    precision: Precision = "fp32"
    group_by_length: bool = True
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(1, gt=0)
    checkpoint_every: int | None = Field(None, gt=0, description="Optimizer steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _budget_has_room(self):
        if self.max_tokens_per_batch and self.batch_size == 1:
            raise ValueError(
                "max_tokens_per_batch with batch_size 1 batches one sample at a time; set batch_size to the most "
                "samples a batch may hold"
            )
        return self


ScalarMetric = Literal[
    "json_exact_match",
    "json_exact_match_strict",
    "json_exact_match_normalized",
    "field_f1",
    "ted_accuracy",
    "anls_star",
    "valid_json_rate",
    "schema_conformance_rate",
]


class EvalSection(Section):
    split: Literal["val", "test"] = "val"
    before_training: bool = True
    after_training: bool = True
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    max_samples: int | None = Field(None, gt=0)
    # Which exact-match mode is the headline `json_exact_match` (finetune/metrics.py documents both).
    headline: Literal["strict", "normalized"] = "strict"
    # Schema-constrained decoding (xgrammar): output is always parseable JSON of the skeleton's shape.
    constrained: bool = False
    # Longest string the constrained grammar allows; None: twice the longest string in the training targets (≥ 16).
    max_string_length: int | None = Field(None, gt=0)
    # Also evaluate every N optimizer steps (and at each stage's end) on the first `during_training_samples`
    # samples of the split; the model scoring best on `best_metric` is saved to best/.
    every_steps: int | None = Field(None, gt=0)
    during_training_samples: int | None = Field(64, gt=0)
    best_metric: ScalarMetric = "json_exact_match"
    report: bool = True  # report.html beside the predictions


class OutputSection(Section):
    dir: str = "runs/run"
    # An existing run folder is never silently reused: `error` refuses, `resume` continues from its latest
    # checkpoint, `overwrite` deletes it first.
    if_exists: Literal["error", "resume", "overwrite"] = "error"


class TrackingSection(Section):
    report_to: Annotated[list[Tracker], Frozen] = Field(default_factory=FrozenList)
    project: str = "finetune"
    run_name: str | None = None


class MixSource(Section):
    source: SourceSpec = Field(
        description="Like data.train: JSONL, dataset folder, imagefolder, hf:org/name:split, or a format mapping."
    )
    weight: float = Field(gt=0, description="Relative probability that a drawn sample comes from this source.")


class StageDataSection(Section):
    """A stage's own training data: one source, or a weighted mix (drawn with probability ∝ weight)."""

    train: SourceSpec | None = None
    mix: Annotated[list[MixSource], Frozen] | None = None
    # Samples drawn per epoch from a mix (default: the mix's total size).
    samples_per_epoch: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.train is None) == (self.mix is None):
            raise ValueError("give exactly one of train (a source) or mix (weighted sources)")
        if self.samples_per_epoch is not None and self.mix is None:
            raise ValueError("samples_per_epoch applies to a mix only")
        return self


# The preference losses a `kind: dpo` stage offers: TRL DPOTrainer's per-pair `loss_type`s, computed as TRL computes
# them (finetune/training/dpo.py; tests/test_dpo.py checks each against DPOTrainer). TRL's `aot` variants are left
# out: they sort the whole batch, so a pair's loss would depend on which pairs share its micro-batch.
DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
]


class DpoSection(Section):
    """A preference stage's settings (`kind: dpo`): the loss, and where its (chosen, rejected) pairs come from."""

    # The reference model's weight in the loss: larger keeps the policy closer to the model as the stage starts.
    beta: float = Field(0.1, gt=0)
    loss: DpoLoss = "sigmoid"
    # robust: the assumed share of flipped preferences; exo_pair: its epsilon (must be > 0 there).
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # Weight of an added NLL term on the chosen answers (TRL's "sft" loss beside the preference loss; RPO).
    sft_weight: float = Field(0.0, ge=0.0)
    # `self`: at the stage's start the model answers the stage's training data; each answer that is not the gold
    # JSON becomes a rejected answer, the gold the chosen one. `preference`: the pairs of `data.preference`.
    pairs: Literal["self", "preference"] = "self"
    # `pairs: self`: answers sampled per image besides the greedy one (each wrong one is a pair of its own), and
    # their temperature.
    sampled: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    # `pairs: self`: the longest answer generated; None: eval.max_new_tokens.
    max_new_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _loss_settings(self):
        if self.loss == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("loss exo_pair needs label_smoothing > 0 (its epsilon)")
        if self.label_smoothing and self.loss not in ("robust", "exo_pair"):
            raise ValueError(f"label_smoothing applies to losses robust and exo_pair, not {self.loss}")
        if self.pairs == "preference" and (self.sampled or self.temperature != 1.0 or self.max_new_tokens):
            raise ValueError("sampled, temperature and max_new_tokens apply to pairs: self only")
        return self


class StageSection(Section):
    """One training stage: which groups train and how, at which learning rates, for how long, on what data."""

    name: str
    # `sft`: next-token loss on the gold answers. `dpo`: a preference loss on (chosen, rejected) answer pairs against
    # the model as the stage starts (finetune/training/dpo.py); settings in `dpo`.
    kind: Literal["sft", "dpo"] = "sft"
    dpo: DpoSection | None = None
    groups: Annotated[dict[str, GroupMode], Frozen]
    # One learning rate for the stage's trainable groups or one per group; None: optim.lr.
    lr: float | Annotated[dict[str, float], Frozen] | None = None
    # Budget: at most one of these; none given = the train section's epochs / max_steps. `fraction` is a share
    # of the train section's budget (how the `schedule:` presets split it).
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0, le=1)
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    data: StageDataSection | None = None  # None: data.train
    # Generate-and-score on the eval split when the stage ends (the last stage's is eval.after_training).
    eval_at_end: bool = True

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value):
        values = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(v <= 0 for v in values):
            raise ValueError("learning rates must be > 0")
        return value

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("epochs", "max_steps", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of epochs, max_steps, fraction (got {', '.join(given)})")
        if self.dpo is not None and self.kind != "dpo":
            raise ValueError("dpo settings apply to a stage of kind dpo (add kind: dpo)")
        return self

    @property
    def preference(self) -> DpoSection | None:
        """The stage's DPO settings (defaults where the recipe gives none), or None for an SFT stage."""
        if self.kind != "dpo":
            return None
        return self.dpo or DpoSection()


class Recipe(Section):
    """A whole training recipe."""

    model: ModelSection
    data: DataSection
    tuning: TuningSection = Field(default_factory=TuningSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    # Training stages, run in order in one job (finetune/training/stages.py). Or a shorthand: `paper` (the
    # family's published schedule adapted to fine-tuning), `lora` (LLM LoRA, rest frozen), `full` (all full).
    # Neither: one stage from tuning.groups, optim.lr and the train budget.
    stages: Annotated[list[StageSection], Frozen] | None = Field(None, min_length=1)
    schedule: Literal["paper", "lora", "full"] | None = None

    _origin: Origin = PrivateAttr(default_factory=Origin)

    @property
    def origin(self) -> Origin:
        return self._origin

    def where(self, key: str) -> str:
        """The file and line (or command-line override) to name in a message about `key`."""
        return self._origin.where(key)

    def with_origin(self, origin: Origin) -> Recipe:
        self._origin = origin  # set once, by the loader, right after validation
        return self


class ResolvedRecipe(Recipe):
    """A recipe ready to run: the stages to run in `stages` (presets expanded; `schedule` and `tuning.groups`
    folded into them), one learning rate per trainable group in every stage, the prompt skeleton filled in.
    Built by :func:`finetune.resolve.resolve_recipe`; immutable like every recipe; its dump is the run
    folder's `recipe.yaml`."""

    stages: Annotated[list[StageSection], Frozen] = Field(min_length=1)

    @model_validator(mode="after")
    def _resolved(self):
        if self.schedule is not None or self.tuning.groups is not None:
            raise ValueError("a resolved recipe gives its modes in stages only (schedule and tuning.groups unset)")
        if self.data.prompt.skeleton is None:
            raise ValueError("a resolved recipe has its prompt skeleton")
        unfilled = [stage.name for stage in self.stages if not isinstance(stage.lr, dict)]
        if unfilled:
            raise ValueError(f"stages {unfilled}: a resolved stage has one learning rate per trainable group")
        return self


def data_sources(recipe: Recipe) -> dict[str, str | DataSource]:
    """The data sources a recipe names, as written (a string or a DataSource), by key path (splits, and each
    stage's own data)."""
    sources = {}
    for split in ("train", "val", "test", "preference"):
        value = getattr(recipe.data, split)
        if value is not None:
            sources[f"data.{split}"] = value
    for i, stage in enumerate(recipe.stages or []):
        if stage.data is not None and stage.data.train is not None:
            sources[f"stages.{i}.data.train"] = stage.data.train
        for j, part in enumerate(stage.data.mix or [] if stage.data else []):
            sources[f"stages.{i}.data.mix.{j}.source"] = part.source
    return sources


def data_paths(recipe: Recipe) -> dict[str, Path]:
    """The paths of the data sources a recipe names, by key path (a DataSource: its `path`)."""
    return {key: Path(v if isinstance(v, str) else v.path) for key, v in data_sources(recipe).items()}
