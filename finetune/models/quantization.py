"""QLoRA loading: a family's frozen base quantised by bitsandbytes, as transformers loads any quantised model.

`tuning.quantization: {bits: 4 | 8, skip: [vision, projector]}` becomes a :class:`Quantization`, which a family's
`load_model` turns into `from_pretrained(..., quantization_config=...)` through :meth:`Quantization.loading_kwargs`:
transformers replaces each `nn.Linear` by bitsandbytes' `Linear4bit` (NF4, double quantisation, bf16 compute: the
QLoRA paper's setting) or `Linear8bitLt` as the weights load, so the full-precision base never sits in memory.

Kept in the weights' own precision (`llm_int8_skip_modules`, matched by transformers as a prefix of the module's
name, so each entry is a full module path):
- the groups named in `skip` (their family group prefixes), e.g. a vision tower a later stage trains in full;
- the output embedding (`lm_head`): quantising it is what transformers itself avoids, and LoRA never targets it;
- in 4-bit, linear layers with fewer than 64 inputs: bitsandbytes quantises in blocks of 64 and such layers fail at
  their first forward on the CPU. Only tiny models have them; they are listed in `Quantization.narrow` so the run
  can say so.

The module names come from the model built on the meta device from its config (no memory, no weights), so the list
is exact for every family and every size. Memory: a 4-bit weight costs 0.5 byte + ~0.127 bit of double-quantised
scales per parameter, against 2 bytes in bf16 and 4 in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune.errors import UserError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bitsandbytes' 4-bit block size: a layer with fewer inputs than this cannot be quantised in 4-bit on the CPU.
MIN_4BIT_IN_FEATURES = 64


def require_bitsandbytes() -> None:
    """bitsandbytes importable, else one line saying how to install it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "tuning.quantization needs bitsandbytes: pip install 'finetune[qlora]' (or pip install bitsandbytes)"
        ) from None


@dataclass
class Quantization:
    """How to quantise a family's base at load time. `skip_prefixes`: module prefixes kept unquantised (the skipped
    groups'). Filled by `loading_kwargs`: `narrow`, the 4-bit layers kept unquantised for having too few inputs."""

    bits: int
    skip_prefixes: tuple[str, ...] = ()
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    narrow: list[str] = field(default_factory=list)

    @classmethod
    def from_recipe(cls, section, group_prefixes: dict[str, tuple[str, ...]]) -> Quantization:
        """From `tuning.quantization` (a QuantizationSection) and the family's group prefixes."""
        prefixes = tuple(p for group in section.skip for p in group_prefixes[group])
        return cls(
            bits=section.bits,
            skip_prefixes=prefixes,
            quant_type=section.quant_type,
            double_quant=section.double_quant,
            compute_dtype=section.compute_dtype,
        )

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return f"4-bit {self.quant_type.upper()}" + (" with double quantisation" if self.double_quant else "")

    def loading_kwargs(self, model_class, config) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that load `model_class(config)` quantised."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        keep = self.unquantised_modules(model_class, config)
        if self.bits == 8:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
        else:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
                llm_int8_skip_modules=keep,
            )
        return {"quantization_config": bnb}

    def unquantised_modules(self, model_class, config) -> list[str]:
        """Full names of the modules transformers must leave unquantised (see the module docstring), as anchored
        regexes (transformers matches each entry as a regex from the start of the module's name)."""
        with torch.device("meta"):
            skeleton = model_class(config)
        output = skeleton.get_output_embeddings()
        names = {module: name for name, module in skeleton.named_modules()}
        keep = [p.rstrip(".") for p in self.skip_prefixes]
        if output is not None and output in names:
            keep.append(names[output])
        self.narrow = []
        if self.bits == 4:
            for name, module in skeleton.named_modules():
                if (
                    isinstance(module, torch.nn.Linear)
                    and module.in_features < MIN_4BIT_IN_FEATURES
                    and not name.startswith(self.skip_prefixes)
                    and module is not output
                ):
                    self.narrow.append(name)
                    keep.append(name)
        return [re.escape(name) for name in keep]
