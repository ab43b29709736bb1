"""What a native processor's chat template and expansion say about prompts, answers and token counts.

Read once per processor (`PromptFormat.of`), by rendering and processing small probes:
- the prompt is the template's user turn with the generation prompt; the answer span is found by rendering the
  conversation with and without an assistant answer: the template must write the prompt, then the answer verbatim,
  then the token that closes the turn (the end-of-turn token, labelled and a stop token); training writes the
  generation prompt before the answer, as inference does. A template that rewrites the answer, or closes the turn
  with no single token, is refused with one line.
- a processor without a chat template (PaliGemma's pt checkpoints) is prompted as it prompts itself: the instruction
  as `text`, the processor adding image tokens and its own framing, the answer closed by EOS.
- per-token inputs (`token_type_ids` and the like: Gemma 3's image blocks, PaliGemma's prefix) are rebuilt for a padded
  batch from a rule read off the processor's own output (a value per token id in the prompt, one for answer tokens,
  0 for pads), checked against that output.
- prompt lengths are counted without pixels from the processor's image-token arithmetic
  (`_get_num_multimodal_tokens`) where the probes show it counts the whole expansion; otherwise each distinct set
  of page sizes is processed once on blank pages and the count cached.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from PIL import Image

from finetune.errors import UserError
from finetune.progress import info

_PROBE_ANSWER = '{"number": "12345", "total": "9.99"}'
# Keys a processor returns that are neither per-token inputs nor image tensors.
TEXT_KEYS = ("input_ids", "attention_mask", "labels")


def _user_turn(instruction: str, num_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": instruction}]}


@dataclass
class PromptFormat:
    """How one processor writes prompts and answers (see the module docstring)."""

    templated: bool
    end_of_turn: str
    # Per-token keys → (value per token id in a prompt, default for other prompt tokens, value for answer tokens).
    token_rules: dict[str, tuple[dict[int, int], int, int]]
    # Whether `_get_num_multimodal_tokens` + the text's own tokens give the processed length.
    counts_by_arithmetic: bool
    counted: dict = field(default_factory=dict)  # fallback cache: (prompt, sizes) → length

    @classmethod
    def of(cls, processor, what: str) -> PromptFormat:
        cached = getattr(processor, "_finetune_prompt_format", None)
        if cached is not None:
            return cached
        found = cls._read(processor, what)
        processor._finetune_prompt_format = found
        return found

    @classmethod
    def _read(cls, processor, what: str) -> PromptFormat:
        tokenizer = processor.tokenizer
        templated = bool(getattr(processor, "chat_template", None))
        if templated:
            user = _user_turn("Read it.", 1)
            answer = {"role": "assistant", "content": [{"type": "text", "text": _PROBE_ANSWER}]}
            full = processor.apply_chat_template([user, answer], tokenize=False)
            # Trained as served: the generation prompt, then the answer as the template writes it in a conversation,
            # then the token that closes the turn there. (The header a template writes before a past answer may
            # differ from its generation prompt: llava-hf's OneVision writes `assistant \n` there, `assistant\n` here.)
            if full.count(_PROBE_ANSWER) != 1:
                raise UserError(
                    f"{what}: the chat template does not write the assistant's answer verbatim (it rewrites or drops "
                    "it), so the answer's tokens cannot be told apart"
                )
            rest = full[full.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
            first = tokenizer(rest, add_special_tokens=False)["input_ids"][:1]
            token = tokenizer.convert_ids_to_tokens(first[0]) if first else None
            if token is None or token not in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
                raise UserError(
                    f"{what}: the chat template closes the assistant's turn with {rest[:20]!r}, not a special token"
                )
            end_of_turn = token
        else:
            if tokenizer.eos_token is None:
                raise UserError(f"{what}: no chat template and no EOS token: cannot tell where an answer ends")
            end_of_turn = tokenizer.eos_token
        format_ = cls(templated, end_of_turn, {}, False)
        format_.token_rules = format_._read_token_rules(processor, what)
        format_.counts_by_arithmetic = format_._arithmetic_holds(processor)
        if not format_.counts_by_arithmetic:
            info(
                f"{what}: the processor's image-token arithmetic does not count its whole expansion; prompt lengths "
                "are measured by processing blank pages once per set of page sizes (cached)"
            )
        return format_

    # --- prompts --------------------------------------------------------------------------------------------------
    def render(self, processor, instruction: str, num_images: int) -> str:
        if not self.templated:
            return instruction
        return processor.apply_chat_template(
            [_user_turn(instruction, num_images)], add_generation_prompt=True, tokenize=False
        )

    def _tokenizer_options(self) -> dict:
        # A rendered template already holds the BOS it wants (Gemma's writes `<bos>`): the tokenizer adds none.
        return {"add_special_tokens": False} if self.templated else {}

    def process(self, processor, images: list[Image.Image], prompt: str, **kwargs):
        return processor(
            images=[images] if images else None,
            text=[prompt],
            return_tensors="pt",
            **self._tokenizer_options(),
            **kwargs,
        )

    # --- per-token inputs ------------------------------------------------------------------------------------------
    def _read_token_rules(self, processor, what: str) -> dict:
        images = [_blank((64, 64)), _blank((96, 48))]
        prompt = self.render(processor, "Read it.", len(images))
        out = self.process(processor, images, prompt)
        ids = out["input_ids"][0]
        keys = [
            k for k, v in out.items() if k not in TEXT_KEYS and torch.is_tensor(v) and v.shape == out["input_ids"].shape
        ]
        answer_values = {}
        if keys and "suffix" in inspect.signature(type(processor).__call__).parameters:
            # A processor that takes the answer as `suffix` (PaliGemma) marks the answer's tokens itself.
            with_answer = self.process(processor, images, prompt, suffix=[_PROBE_ANSWER])
            answer_values = {k: int(with_answer[k][0, -1]) for k in keys}
        rules = {}
        for key in keys:
            values = out[key][0]
            default = int(values[-1])  # the prompt's last token is text
            special = {int(i): int(v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if int(v) != default}
            rule = (special, default, answer_values.get(key, default))
            if not torch.equal(self._apply_rule(rule, ids[None], torch.zeros_like(ids)[None] - 100), values[None]):
                raise UserError(f"{what}: the processor's per-token input '{key}' follows no rule of token ids")
            rules[key] = rule
        return rules

    @staticmethod
    def _apply_rule(rule, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> torch.Tensor:
        special, default, answer = rule
        values = torch.full_like(input_ids, default)
        for token_id, value in special.items():
            values[input_ids == token_id] = value
        values[labels != -100] = answer
        if attention_mask is not None:
            values[attention_mask == 0] = 0
        return values

    # --- counting ------------------------------------------------------------------------------------------------
    def _arithmetic_tokens(self, processor, sizes) -> int | None:
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        if counter is None:
            return None
        try:
            data = counter(image_sizes=[(h, w) for w, h in sizes])
        except Exception:  # a processor whose arithmetic does not apply: measure instead
            return None
        per_image = data.get("num_image_tokens") if isinstance(data, dict) else getattr(data, "num_image_tokens", None)
        return None if per_image is None else int(sum(per_image))

    def _text_tokens(self, processor, prompt: str) -> int:
        return len(processor.tokenizer(prompt, **self._tokenizer_options())["input_ids"])

    def _arithmetic_holds(self, processor) -> bool:
        for sizes in ([(64, 64)], [(600, 4000), (3000, 800)], [(20, 20)]):
            prompt = self.render(processor, "Read it.", len(sizes))
            counted = self._arithmetic_count(processor, prompt, sizes)
            if counted is None or counted != self._measure(processor, prompt, sizes):
                return False
        return True

    def _arithmetic_count(self, processor, prompt: str, sizes) -> int | None:
        if not self.templated:  # the processor frames the instruction itself: its lengths are measured
            return None
        image_tokens = self._arithmetic_tokens(processor, sizes)
        if image_tokens is None:
            return None
        # Each placeholder in the rendered text is replaced by the image's tokens.
        return self._text_tokens(processor, prompt) - len(sizes) + image_tokens

    def _measure(self, processor, prompt: str, sizes) -> int:
        key = (prompt, tuple(sizes))
        if key not in self.counted:
            self.counted[key] = int(self.process(processor, [_blank(s) for s in sizes], prompt)["input_ids"].shape[1])
        return self.counted[key]

    def count(self, processor, prompt: str, sizes) -> int:
        if self.counts_by_arithmetic:
            return self._arithmetic_count(processor, prompt, sizes)
        return self._measure(processor, prompt, sizes)


def _blank(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", tuple(size), (255, 255, 255))
