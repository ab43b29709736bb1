"""One dropout mask for the LoRA adapters that read the same input (`tuning.lora.shared_dropout`, on by default).

PEFT gives every LoRA layer its own `nn.Dropout` on the layer's input. In a decoder layer q, k and v read the same
hidden states, and gate and up read the same normalised states, so a step draws seven full-size random masks per
layer where four distinct inputs exist: `bernoulli_` and the multiply were 8% of a CPU training step
(BENCHMARKS.md, "Training throughput"), and autograd keeps every dropped copy for the backward of its `lora_A`.
Here the adapters under one parent module (an attention or MLP block) share one dropout that remembers its last
input: the same tensor again (same object, not modified since) gets the same dropped tensor back. Each adapter still
sees its input under dropout with probability p, as LoRA specifies; only the masks of siblings are the same draw.
The memory goes when the parent's forward ends (a forward hook), and a checkpointed layer's recomputation draws the
same masks again (torch's checkpoint restores the RNG state, and the draws come in the same order).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn


class SharedInputDropout(nn.Module):
    """Dropout that returns the same dropped tensor for the same input tensor until `forget()`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._input: weakref.ref | None = None
        self._version = -1
        self._output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self._input is not None and self._input() is x and x._version == self._version:
            return self._output
        output = F.dropout(x, self.p, training=True)
        self._input, self._version, self._output = weakref.ref(x), x._version, output
        return output

    def forget(self) -> None:
        self._input, self._output = None, None

    def extra_repr(self) -> str:
        return f"p={self.p}, shared"


def share_lora_dropout(model: nn.Module, adapter: str = "default") -> None:
    """Give the LoRA layers of `model` that sit under one parent module a single `SharedInputDropout` (none where
    dropout is off or a parent holds one adapter)."""
    by_parent: dict[str, list[nn.Module]] = defaultdict(list)
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and adapter in dropouts and isinstance(dropouts[adapter], nn.Dropout):
            by_parent[name.rpartition(".")[0]].append(module)
    for parent_name, layers in by_parent.items():
        if len(layers) < 2:
            continue
        shared = SharedInputDropout(layers[0].lora_dropout[adapter].p)
        for layer in layers:
            layer.lora_dropout[adapter] = shared
        model.get_submodule(parent_name).register_forward_hook(lambda *_, shared=shared: shared.forget())
