"""Loading and saving a transformers-native processor without torchvision.

Many native VLM processors (Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL, LLaVA-OneVision) also hold a video processor,
and transformers' video processors need torchvision, which cannot be installed beside the CPU torch wheel (and
documents have no video). :func:`image_only_class` derives, from the processor class a checkpoint names, a subclass
that loads and saves every other part (image processor, tokenizer, chat template, the processor's own arguments)
and leaves the video processor out. A folder it saves still names the stock class, so wherever torchvision exists
`AutoProcessor` loads it as usual.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from finetune.errors import UserError

# Files that may name a checkpoint's processor class, in the order transformers' AutoProcessor looks at them.
_CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def processor_class_name(folder: Path) -> str | None:
    """The `processor_class` a checkpoint folder names (None when none of its files does)."""
    for name in _CLASS_FILES:
        path = Path(folder) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("processor_class")
            except ValueError as err:
                raise UserError(f"{path}: not valid JSON ({err})") from None
            if value:
                return value
    return None


@functools.cache
def image_only_class(cls: type) -> type:
    """`cls` (a ProcessorMixin subclass) without its video processor; `cls` itself when it has none."""
    attributes = [a for a in cls.get_attributes() if "video" not in a]
    if attributes == list(cls.get_attributes()):
        return cls

    def get_attributes(_cls) -> list[str]:
        return list(attributes)

    def to_dict(self):
        data = cls.to_dict(self)
        data["processor_class"] = cls.__name__  # the stock class: what AutoProcessor must load elsewhere
        return data

    return type(
        f"ImageOnly{cls.__name__}",
        (cls,),
        {"get_attributes": classmethod(get_attributes), "to_dict": to_dict, "__module__": cls.__module__},
    )


def processor_class(name: str) -> type:
    """The transformers processor class called `name`, image-only; one line when transformers has none."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    try:
        cls = processor_class_from_name(name)
    except ImportError as err:  # a processor that needs a backend missing here (torchvision for Pixtral's)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"processor class {name} cannot be loaded here: {first}") from None
    if cls is None:
        raise UserError(f"processor class {name} is not in this transformers; upgrade transformers")
    return image_only_class(cls)


def load_native_processor(folder: Path):
    """The processor a checkpoint folder names, loaded by its own class without the video processor."""
    name = processor_class_name(folder)
    if name is None:
        raise UserError(f"{folder}: no processor_class in {', '.join(_CLASS_FILES)}; not a vision-language checkpoint?")
    cls = processor_class(name)
    return cls.from_pretrained(folder)


def save_hub_layout(processor, out_dir: Path) -> None:
    """Save a processor in the file layout of the Hub's VLM repos, which transformers 4 and 5, vLLM and TGI all read:
    the image processor in `preprocessor_config.json`, the processor's own arguments flat in `processor_config.json`,
    the chat template in `chat_template.json`, and the tokenizer's files."""
    out_dir = Path(out_dir)
    processor.save_pretrained(out_dir)
    name = type(processor).__mro__[1].__name__ if type(processor).__name__.startswith("ImageOnly") else None
    name = name or type(processor).__name__
    config_path = out_dir / "processor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    image_config = config.pop("image_processor", None) or processor.image_processor.to_dict()
    image_config["processor_class"] = name
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
    config.pop("video_processor", None)
    config["processor_class"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = out_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():  # the tokenizer records the processor's class too: the stock one
        data = json.loads(tokenizer_config.read_text())
        if "processor_class" in data:
            data["processor_class"] = name
            tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    template = out_dir / "chat_template.jinja"
    if template.is_file():
        (out_dir / "chat_template.json").write_text(
            json.dumps({"chat_template": template.read_text()}, indent=2) + "\n"
        )
        template.unlink()
