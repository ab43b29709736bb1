"""What every model family provides to the generic data, training and evaluation code.

A family module (`finetune/models/<family>.py`, or a package when it needs more) subclasses :class:`ModelFamily`
and keeps all of its quirks — checkpoint loading, processor, chat format, module groups, batching of image tensors,
how it is served — to itself. The registry (`finetune.models`) is derived from these classes.
"""

from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value the loss ignores (PyTorch's cross_entropy default)


@dataclass
class Encoded:
    """One tokenised sample: text ids, labels aligned with them, and the family's image tensors."""

    input_ids: list[int]
    labels: list[int]
    image_inputs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def pages_per_text(images, text) -> tuple[list[str], list[list[Image.Image]]]:
    """A processor call's texts and, for each, its pages: `text` one string or a list; `images` a list of page lists,
    a flat list of pages (all for the one text, or one per text), or None."""
    texts = [text] if isinstance(text, str) else list(text or [])
    if images and isinstance(images[0], Image.Image):
        images = [images] if len(texts) == 1 else [[image] for image in images]
    images = images or [[] for _ in texts]
    if len(images) != len(texts):
        raise ValueError(f"{len(texts)} texts but images for {len(images)}")
    return texts, images


# Large pages are decoded reduced (`finetune.data.dataset.load_image`): the page's full (EXIF-oriented) size travels in
# `image.info[SOURCE_SIZE_KEY]`, so that a family's preprocessing picks its grid from the page as it is, not as decoded,
# and in `image.info[SOURCE_BOX_KEY]` the fractional box of the reduced image that the full page covers (a reduction
# rounds each side up: its last row and column stand for less than n of the page's, and an EXIF rotation may bring
# them to the top or the left), for resampling with the full page's geometry.
SOURCE_SIZE_KEY = "finetune.source_size"
SOURCE_BOX_KEY = "finetune.source_box"


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """`size` reduced by a whole `factor`, each side rounded up: what JPEG's DCT scaling, `Image.reduce` and a PDF
    rendered at 1/factor of its scale produce."""
    return -(-size[0] // factor), -(-size[1] // factor)


def source_size(image: Image.Image) -> tuple[int, int]:
    """The full size of the page `image` was decoded from: `info[SOURCE_SIZE_KEY]` when the image is that page reduced
    by a whole factor (checked, so that a stale value on a since-resized copy is ignored), else its own size."""
    source = image.info.get(SOURCE_SIZE_KEY)
    if not source or tuple(source) == image.size:
        return image.size
    factor = max(1, round(source[0] / image.width))
    return tuple(source) if reduced_size(tuple(source), factor) == image.size else image.size


def source_box(image: Image.Image) -> tuple[float, float, float, float] | None:
    """The box of `image` (fractional pixels) that the full page covers, when it is a reduced decode (`source_size`
    differs from its size); None for a full one, whose resampling then runs exactly as it always has."""
    if source_size(image) == image.size:
        return None
    box = image.info.get(SOURCE_BOX_KEY)
    return tuple(box) if box else (0.0, 0.0, float(image.width), float(image.height))


def largest_reduction(size: tuple[int, int], usable, max_factor: int = 64) -> tuple[int, int]:
    """`reduced_size(size, n)` for the largest n such that `usable(reduced_size(size, m))` holds for every m in 1..n:
    the least size a family can take a page of `size` at, when every whole-factor reduction down to it must work."""
    best = size
    for factor in range(2, max_factor + 1):
        candidate = reduced_size(size, factor)
        if not usable(candidate):
            break
        best = candidate
    return best


REMOTE_CODE_KEY = "auto_map"  # top-level key of config.json / tokenizer / processor configs naming remote classes


def remote_code_files(folder: Path) -> list[Path]:
    """What in a saved folder (and its subfolders) asks a loader to run code shipped with it: `*.py` files, and
    JSON files (config.json, tokenizer_config.json, processor configs) with a top-level `auto_map`."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".py" or (path.suffix == ".json" and _has_auto_map(path)):
            found.append(path)
    return found


def _has_auto_map(path: Path) -> bool:
    if f'"{REMOTE_CODE_KEY}"'.encode() not in path.read_bytes():  # cheap: most files (tokenizer.json) never say it
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and REMOTE_CODE_KEY in data


def drop_remote_code(folder: Path) -> list[str]:
    """Remove from a saved folder what `remote_code_files` finds: the `*.py` files, and `auto_map` from the JSON
    files (rewritten otherwise unchanged). Returns the relative paths changed."""
    changed = []
    for path in remote_code_files(folder):
        if path.suffix == ".py":
            path.unlink()
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            del data[REMOTE_CODE_KEY]
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        changed.append(path.relative_to(folder).as_posix())
    return changed


def _resolve_module_path(model: torch.nn.Module, path: str, subgroup: str) -> str:
    """`a.b.-1` → `a.b.11` for a model whose `a.b` holds 12 modules; an unknown path is one line naming it."""
    from finetune.errors import UserError

    module, resolved = model, []
    for part in path.split("."):
        if re.fullmatch(r"-?\d+", part) and isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            index = int(part)
            if not -len(module) <= index < len(module):
                raise UserError(f"subgroup '{subgroup}': {path}: index {index} outside a list of {len(module)}")
            part = str(index % len(module))
            child = module[int(part)]
        else:
            child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            raise UserError(f"subgroup '{subgroup}': {path}: the model has no module '{'.'.join([*resolved, part])}'")
        module = child
        resolved.append(part)
    return ".".join(resolved)


class ModelFamily(ABC):
    """Interface of a model family. Instances are stateless; the processor is passed in explicitly."""

    name: ClassVar[str]
    # config.json `model_type`s this family loads (each belongs to exactly one family).
    model_types: ClassVar[tuple[str, ...]]
    # Module groups → parameter-name prefixes (names as in the un-wrapped model). Every parameter must fall
    # into exactly one group: `assign_groups` fails loudly otherwise.
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]]
    # Default LoRA leaf-module targets per group.
    default_lora_targets: ClassVar[dict[str, tuple[str, ...]]]
    # Per group: modules PEFT saves beside the adapter when the group is `full` in a LoRA run.
    modules_to_save: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Parameters the forward pass never uses (so DDP need not search for unused parameters every step).
    never_used_parameters: ClassVar[tuple[str, ...]] = ()
    # Whether `save_pretrained` writes a layout transformers' own classes (AutoModelForImageTextToText) load and
    # compute the same with. False for a family whose only faithful reader is its original remote code (Ovis).
    saves_transformers_layout: ClassVar[bool] = True
    # Groups carved out of a group above, for schedules finer than a group: name → (parent group, module paths; a
    # negative number indexes a module list from its end). Recipes add their own (`tuning.subgroups`).
    subgroups: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {}
    subgroup_parents: ClassVar[dict[str, str]] = {}  # set on a carved copy (with_subgroups): subgroup → parent

    # --- loading ---------------------------------------------------------------------------------------
    @abstractmethod
    def load_processor(self, path: str, revision: str | None = None, **options):
        """The family's processor (tokenizer + image processor + chat template) for a checkpoint; `options` are
        the recipe's `model.processor` settings (unknown ones are errors). `path`, a folder or Hub id, goes through
        `finetune.models.hub.resolve_checkpoint` first, so a missing one is one line, at once."""

    @abstractmethod
    def load_model(
        self,
        path: str,
        *,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        quantization=None,
    ) -> torch.nn.Module:
        """The model, with every checkpoint weight accounted for (`path` resolved as for `load_processor`).
        `quantization` (a `finetune.models.quantization.Quantization`): load the base quantised (QLoRA), passing
        `quantization.loading_kwargs(model_class, config)` to `from_pretrained`."""

    @abstractmethod
    def save_pretrained(
        self,
        model: torch.nn.Module,
        processor,
        out_dir: Path,
        source_path: str | None = None,
        state_dict: dict | None = None,
        remote_code: bool = False,
    ) -> None:
        """Save a (merged or fully trained) model with processor, tokenizer and chat template. `source_path`:
        the checkpoint it came from (files we cannot rebuild are copied from it); `state_dict`: gathered weights
        (ZeRO-3 / FSDP); `remote_code` (the recipe's `model.trust_remote_code`): keep the source's remote code
        (`*.py`, `auto_map`) in the saved folder; without it none is saved (`drop_remote_code`)."""

    # --- text and images ---------------------------------------------------------------------------------
    @abstractmethod
    def render_prompt(self, processor, instruction: str, num_images: int) -> str:
        """The chat-formatted prompt text up to and including the assistant's turn header."""

    def prompt_format(self, processor) -> dict[str, Any]:
        """The processor options, beyond the recipe's, that decide how a prompt is written (e.g. `page_labels`).
        Each checkpoint records them, so that a resumed run writes its prompts as the run began."""
        return {}

    def legacy_prompt_format(self) -> dict[str, Any]:
        """The prompt format of a checkpoint that records none (written before prompt formats were recorded)."""
        return {}

    @abstractmethod
    def end_of_turn_token(self, processor) -> str:
        """The token that closes the assistant's turn (labelled, and a stop token for generation)."""

    @abstractmethod
    def encode_prompt(self, processor, images: list[Image.Image], prompt_text: str) -> Encoded:
        """Tokenise the prompt with the images' placeholder tokens expanded; labels all IGNORE_INDEX."""

    @abstractmethod
    def count_prompt_tokens(self, processor, prompt_text: str, image_sizes: list[tuple[int, int]]) -> int:
        """Length of `encode_prompt`'s ids for images of these (width, height) sizes, without processing pixels
        (used to drop over-length samples before training starts; the dataset checks it per sample)."""

    @abstractmethod
    def collate_images(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch the per-sample image tensors into the model's keyword arguments."""

    def decode_size(self, processor, size: tuple[int, int], num_images: int = 1) -> tuple[int, int]:
        """The least (width, height) a page whose full (EXIF-oriented) size is `size`, one of `num_images` in its
        prompt, may be decoded at and still give this family's pixels for the full page: the same grid and token count
        (chosen from `size`, which `load_image` passes on as `source_size(image)`), and every resampling still a
        downscale, so the tiles equal the full decode's within the resampler's rounding. `load_image` decodes at the
        most reduced `reduced_size(size, n)` that is at least this in both sides; so every whole-factor reduction
        down to it must be usable (`largest_reduction`). The default, `size`, never reduces."""
        return size

    def training_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The forward's inputs for a right-padded training batch.

        Every family here runs a causal LLM over the whole sequence, image tokens included, so no real token can
        attend to the pads that follow it: the padding mask changes nothing a label depends on. Without it SDPA
        and flash attention take their plain causal path; on the CPU that skips the masked half of each score
        matrix instead of materialising a batch × length² mask (most of the LLM's attention time on the small
        benchmark model; BENCHMARKS.md). Pads' own outputs differ, and they carry no label. A family whose LLM
        attends bidirectionally anywhere (a prefix-LM) must keep the mask by overriding this."""
        mask = batch["attention_mask"]
        if not bool(mask[:, 0].all()):  # a left-padded row starts with a pad; without the mask it would be seen
            raise ValueError("training batches must be right-padded (Collator(padding_side='right'))")
        return {key: value for key, value in batch.items() if key != "attention_mask"}

    def stop_token_ids(self, processor) -> list[int]:
        """Token ids that end generation."""
        tokenizer = processor.tokenizer
        ids = {tokenizer.convert_tokens_to_ids(self.end_of_turn_token(processor))}
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return sorted(ids)

    def token_inputs(self, batch: dict[str, Any], features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Per-token inputs (beside input_ids) for a padded batch, e.g. `token_type_ids`; none by default."""
        return {}

    # --- module groups -----------------------------------------------------------------------------------
    def for_checkpoint(self, path: str, revision: str | None = None) -> ModelFamily:
        """This family bound to the checkpoint at `path`. A family whose groups are fixed returns itself; one that
        reads them from the checkpoint (`auto`) returns a copy that holds them."""
        return self

    def with_subgroups(self, model: torch.nn.Module, specs: dict[str, tuple[str, tuple[str, ...]]]) -> ModelFamily:
        """This family with `specs` (name → (parent group, module paths)) carved out of their parents for `model`:
        a copy whose groups put each subgroup's parameters in the subgroup (checked before the parent), whose LoRA
        targets for it are the parent's, and which saves its modules beside an adapter when it trains fully."""
        from finetune.errors import UserError

        if not specs:
            return self
        carved: dict[str, tuple[str, ...]] = {}
        taken: dict[str, str] = {}  # parameter → the subgroup that holds it
        for name, (parent, paths) in specs.items():
            prefixes = tuple(f"{_resolve_module_path(model, path, name)}." for path in paths)
            params = [p for p, _ in model.named_parameters() if p.startswith(prefixes)]
            outside = [p for p in params if self.group_of(p) != parent]
            if not params or outside:
                why = f"{outside[0]} is in group '{self.group_of(outside[0])}'" if outside else "it holds no parameter"
                raise UserError(f"subgroup '{name}': {', '.join(paths)} cannot be carved out of '{parent}': {why}")
            shared = [p for p in params if p in taken]
            if shared:
                raise UserError(f"subgroup '{name}': {shared[0]} is already in subgroup '{taken[shared[0]]}'")
            taken.update(dict.fromkeys(params, name))
            carved[name] = prefixes
        family = copy.copy(self)
        family.subgroup_parents = {n: p for n, (p, _) in specs.items()}
        family.group_prefixes = {**carved, **self.group_prefixes}
        family.default_lora_targets = {
            **self.default_lora_targets,
            **{n: self.default_lora_targets.get(p, ()) for n, (p, _) in specs.items()},
        }
        family.modules_to_save = {**self.modules_to_save, **{n: tuple(x[:-1] for x in carved[n]) for n in carved}}
        return family

    def group_of(self, parameter_name: str) -> str | None:
        """The module group of a parameter name (PEFT's `base_model.model.` prefix is ignored)."""
        # PEFT's prefix, and the path segments of its trainable copies (a full group in a LoRA run), which may hold
        # a subgroup's parameters too.
        name = parameter_name.removeprefix("base_model.model.")
        name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        for group, prefixes in self.group_prefixes.items():
            if name.startswith(prefixes):
                return group
        return None

    def assign_groups(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """Parameter names per group; a parameter in no group is an error (it would silently stay as is)."""
        groups: dict[str, list[str]] = {g: [] for g in self.group_prefixes}
        for name, _ in model.named_parameters():
            group = self.group_of(name)
            if group is None:
                raise ValueError(
                    f"{self.name}: parameter '{name}' belongs to no module group (groups: {self.group_prefixes})"
                )
            groups[group].append(name)
        return groups

    def lora_target_regex(self, targets: dict[str, list[str] | tuple[str, ...]]) -> str:
        """A PEFT `target_modules` regex that matches the given leaf names only inside their groups."""
        alternatives = []
        for group, leaves in targets.items():
            if not leaves:
                continue
            prefixes = "|".join(re.escape(p.rstrip(".")) for p in self.group_prefixes[group])
            names = "|".join(re.escape(leaf) for leaf in leaves)
            alternatives.append(rf"(?:{prefixes})\.(?:.*\.)?(?:{names})")
        if not alternatives:
            raise ValueError("LoRA requested but no target modules given")
        return rf"^(?:{'|'.join(alternatives)})$"

    def check_engine(self, zero_stage: int | None) -> None:
        """Refuse, with the reason, a distributed engine this family's model cannot run under. By default every
        engine is fine; a family that cannot run under one overrides this and raises `UserError`."""
        return None

    # --- publishing ----------------------------------------------------------------------------------------
    def serving_commands(
        self, repo_id: str, *, base: str | None, adapter: bool, remote_code: bool = False
    ) -> list[str]:
        """Shell lines that serve the published `repo_id` with vLLM (shown in its model card). `base`: the base
        checkpoint an adapter applies to; `adapter`: whether `repo_id` holds a LoRA adapter or a whole model;
        `remote_code`: whether the published folder carries remote code (then, and only then, the lines say
        `--trust-remote-code`)."""
        trust = " --trust-remote-code" if remote_code else ""
        if adapter:
            return [f"vllm serve {base}{trust} --enable-lora --lora-modules extractor={repo_id}"]
        return [f"vllm serve {repo_id}{trust}"]

    # --- training schedules ----------------------------------------------------------------------------------
    def schedule(self, name: str, path: str, revision: str | None = None) -> list[dict[str, Any]]:
        """Stages (as recipe `stages:` entries) for a `schedule:` shorthand. `lora`: LoRA on the LLM, the rest
        frozen; `full`: every group fully; both at optim.lr over the whole budget. `paper`: the family's own."""
        if name == "lora":
            return [{"name": "lora", "groups": {g: "lora" if g == "llm" else "frozen" for g in self.group_prefixes}}]
        if name == "full":
            return [{"name": "full", "groups": {g: "full" for g in self.group_prefixes}}]
        if name == "paper":
            return self.paper_schedule(path, revision)
        raise ValueError(f"unknown schedule '{name}'")

    def paper_schedule(self, path: str, revision: str | None = None) -> list[dict[str, Any]]:
        """The published training schedule adapted to fine-tuning; `path` tells model sizes apart."""
        from finetune.errors import UserError

        raise UserError(f"schedule: paper: family '{self.name}' has no published schedule; give stages instead")

    # --- tiny checkpoints ----------------------------------------------------------------------------------
    tiny_presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named size presets for build_tiny_checkpoint

    @abstractmethod
    def build_tiny_checkpoint(self, out_dir: Path, *, seed: int = 0, **sizes) -> Path:
        """Write a tiny randomly initialised checkpoint in the exact Hub layout (offline)."""
