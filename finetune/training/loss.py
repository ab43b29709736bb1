"""The training loss, computed only where there is something to predict.

A document sample is mostly prompt: a 7-tile page is 1,792 image tokens before a few hundred answer tokens, and
only the answer carries labels. The LM head and the cross-entropy over the whole sequence would turn every
position into a vocabulary-wide logit row (batch × length × vocab floats, kept for backward: 1.2 GB for 4
pages with a 32k vocabulary in fp32) that the loss then ignores. Asking the model for logits only at the
positions whose next token is labelled (`logits_to_keep`, which transformers' VLMs accept as an index tensor)
gives the same loss and gradients for a fraction of the head's compute and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.models.base import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is labelled in at least one row of the batch."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def causal_lm_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """sum(cross-entropy of the labelled next tokens) / `num_items_in_batch`, exactly as transformers' causal-LM
    loss computes it (fp32 logits, shifted labels), with logits only where a label follows."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = predicting_positions(labels)
    logits = model(**inputs, logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / num_items_in_batch.to(loss.device)
