"""The preference loss of a `kind: dpo` stage, and the batches it reads.

DPO (Rafailov et al. 2023) raises the log-likelihood of a chosen answer relative to a rejected one, measured against
a reference model: with log-ratios `r = log π(y|x) − log π_ref(y|x)`, the standard ("sigmoid") loss is
`−log σ(β (r_chosen − r_rejected))`. Here the reference is the model as the stage starts; its log-probabilities are
computed once, when the pairs are built (finetune/training/dpo_pairs.py, TRL's `precompute_ref_log_probs`), so no
second copy of the model is kept, a LoRA run's reference includes what earlier stages trained (disabling the
adapter would give the base model instead), and the reference cannot drift while the stage trains.

TRL 1.16 computes its losses inline in `DPOTrainer._compute_loss` (no function to call), so :func:`preference_loss`
repeats its formulas, loss type by loss type, and tests/test_dpo.py checks each against a real `DPOTrainer` on the
same batch. Log-probabilities are summed over each answer's labelled tokens (answer and end-of-turn), as TRL sums
over its completion mask.

A batch holds B pairs as 2B rows, the chosen answers first, then the rejected ones (TRL's concatenated forward): one
forward for both, and the images of a pair are encoded in the same pass. The step's loss is the sum of the per-pair
losses over all micro-batches and processes divided by the number of pairs in the step, so pairs weigh the same
however they are batched (TRL's per-batch mean, for one batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.config import DpoSection
from finetune.data.dataset import Collator, DocumentDataset, Sample
from finetune.models.base import IGNORE_INDEX
from finetune.training.loss import predicting_positions


def sequence_logps(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are. Logits are computed only
    where a label follows (as for the SFT loss), in fp32."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = predicting_positions(labels)
    logits = model(**inputs, logits_to_keep=keep).logits
    targets = labels[:, keep + 1].to(logits.device)
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(dim=1), mask.sum(dim=1)


@dataclass
class PairLoss:
    """Per pair: the loss, and the implicit rewards β·(log-ratio) of its chosen and rejected answers."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    settings: DpoSection,
) -> PairLoss:
    """The per-pair loss of `settings.loss`, as TRL's DPOTrainer computes it (reverse-KL DPO, no length
    desensitisation, no WPO weighting: TRL's defaults)."""
    beta, smoothing = settings.beta, settings.label_smoothing
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    kind = settings.loss
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind in ("ipo", "sigmoid_norm"):
        # Per-token averages (TRL confirmed this normalisation of IPO with its authors).
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * per_token)
    elif kind == "robust":
        clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
        flipped = -smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * smoothing)
    elif kind == "exo_pair":
        qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
        losses = qw * (F.logsigmoid(beta * delta) - math.log1p(-smoothing)) + ql * (
            F.logsigmoid(-beta * delta) - math.log(smoothing)
        )
    elif kind == "nca_pair":
        c, r = beta * chosen_ratio, beta * rejected_ratio
        losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    elif kind == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    elif kind == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif kind == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    elif kind == "apo_down":
        losses = torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(beta * delta))
    else:  # the recipe schema lists the losses; a new one must be added here
        raise ValueError(f"unknown preference loss {kind!r}")
    return PairLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


@dataclass
class PreferencePair:
    """One (chosen, rejected) pair: the sample (its images, prompt and gold answer: the chosen one), the rejected
    answer's token ids, and the reference log-probabilities of both answers (set when the stage starts)."""

    sample: int  # index into the stage's samples
    rejected_ids: list[int]
    kind: str = "greedy"  # greedy | sampled | given
    ref_chosen: float = float("nan")
    ref_rejected: float = float("nan")


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs → model inputs: the prompt (images included) once, followed by the chosen and by the rejected answer;
    labels on each answer's tokens only."""

    def __init__(self, pairs: list[PreferencePair], samples: list[Sample], *, family, processor, instruction_text):
        self.pairs, self.samples = pairs, samples
        self.prompts = DocumentDataset(
            samples, family=family, processor=processor, instruction_text=instruction_text, with_answer=False
        )

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        """Tokens of a pair's two rows as they pad (twice the longer), for length grouping and token budgets."""
        out = []
        for pair in self.pairs:
            sample = self.samples[pair.sample]
            prompt = sample.length - len(sample.answer_ids)
            out.append(2 * (prompt + max(len(sample.answer_ids), len(pair.rejected_ids))))
        return out

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        prompt = self.prompts[pair.sample]
        images = {k: v for k, v in prompt.items() if k not in ("input_ids", "labels", "index")}

        def row(answer: list[int]) -> dict:
            return {
                "input_ids": prompt["input_ids"] + answer,
                "labels": prompt["labels"] + answer,
                "index": index,
                **images,
            }

        return {
            "chosen": row(self.samples[pair.sample].answer_ids),
            "rejected": row(pair.rejected_ids),
            "ref": (pair.ref_chosen, pair.ref_rejected),
            "index": index,
        }


@dataclass
class PreferenceCollator:
    """B pairs → one batch of 2B rows (chosen rows first), padded by the family's collator, with the pairs'
    reference log-probabilities in `ref_logps` (same row order)."""

    collate: Collator

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate([item["chosen"] for item in items] + [item["rejected"] for item in items])
        batch["ref_logps"] = torch.tensor(
            [item["ref"][0] for item in items] + [item["ref"][1] for item in items], dtype=torch.float32
        )
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch


def pair_step_losses(model, family, batch: dict, settings: DpoSection) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch of pairs: (sum of the per-pair preference losses, sum of the chosen answers' token NLL, the
    statistics to log: pairs, reward sums, how many pairs the policy ranks right)."""
    ref = batch.pop("ref_logps").to(batch["input_ids"].device)
    logps, tokens = sequence_logps(model, family.training_inputs(batch))
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.to(logps.device).chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    out = preference_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        settings=settings,
    )
    stats = {
        "pairs": float(chosen.numel()),
        "reward_chosen": out.chosen_rewards.sum().item(),
        "reward_rejected": out.rejected_rewards.sum().item(),
        "ranked_right": (out.chosen_rewards > out.rejected_rewards).sum().item(),
    }
    return out.losses.sum(), -chosen.sum(), stats
