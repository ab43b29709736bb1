"""Schema-constrained decoding: generation that can only produce JSON of the recipe's shape.

The JSON Schema comes from the prompt skeleton refined by the training targets (`finetune.schema`: keys every
target has are required, no other keys, leaf types as seen, nullable). xgrammar compiles it against the tokenizer
once and masks, at every generation step, the tokens that would leave the grammar; its transformers
`LogitsProcessor` does the masking inside `model.generate`.

Bounds make "always parseable" hold within a token budget, also for a model that has not learned anything:
strings get a maximum length, numbers a range and lists a maximum number of items (a grammar with unbounded
strings lets a confused model write one string until `max_new_tokens` runs out). `max_new_tokens` must still
cover the longest answer the bounds allow. The bounds apply to decoding only, not to the schema that scores
conformance. Separators are the compact ones our training targets use (`,` and `:`), so the grammar allows
exactly the formatting the model was trained to write.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from finetune.schema import schema_from_skeleton

# Numbers the grammar allows while decoding; xgrammar turns a range into a bounded digit grammar.
NUMBER_BOUND = 1e12


def longest_string(values) -> int:
    """Length of the longest string anywhere inside the given JSON values (to size the string bound)."""
    return max((len(v) for v in _leaves(values) if isinstance(v, str)), default=0)


def longest_list(values) -> int:
    """Length of the longest list anywhere inside the given JSON values (to size the list bound)."""
    longest, stack = 0, list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            longest = max(longest, len(value))
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return longest


def _leaves(values):
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        else:
            yield value


def decoding_schema(skeleton: dict, *, examples: list | None, max_string_length: int, max_items: int) -> dict:
    """The answer schema (`finetune.schema`) with bounds for decoding: strings of at most `max_string_length`
    characters without raw control characters (xgrammar's length-bounded strings would let them through, and
    they are not valid JSON), numbers within ±NUMBER_BOUND, lists of at most `max_items` items."""
    schema = copy.deepcopy(schema_from_skeleton(skeleton, examples))
    # A JSON string body: any character but quote, backslash and control characters, or an escape; n at most.
    string_body = r'^([^\x00-\x1f"\\]|\\["\\/bfnrt]){0,' + str(max_string_length) + "}$"

    def bound(node: Any) -> None:
        if isinstance(node, dict):
            kinds = node.get("type")
            kinds = kinds if isinstance(kinds, list) else [kinds]
            if "string" in kinds:
                node["pattern"] = string_body
            if "number" in kinds or "integer" in kinds:
                node.update(minimum=-NUMBER_BOUND, maximum=NUMBER_BOUND)
            if "array" in kinds:
                node["maxItems"] = max_items
            for child in node.values():
                bound(child)
        elif isinstance(node, list):
            for child in node:
                bound(child)

    bound(schema)
    return schema


class JsonConstraint:
    """A compiled grammar for one skeleton and tokenizer; `logits_processor()` gives a fresh processor for each
    `generate` call (xgrammar's processor keeps per-call matcher state)."""

    def __init__(
        self,
        tokenizer,
        *,
        vocab_size: int,
        stop_token_ids: list[int],
        skeleton: dict,
        examples: list | None = None,
        max_string_length: int = 64,
        max_items: int = 16,
    ):
        import xgrammar as xgr  # optional at import time: only constrained runs need it

        self.max_string_length, self.max_items = max_string_length, max_items
        self.schema = decoding_schema(
            skeleton, examples=examples, max_string_length=max_string_length, max_items=max_items
        )
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.grammar = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(self.schema), any_whitespace=False, separators=(",", ":")
        )

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        family,
        processor,
        skeleton: dict,
        *,
        examples: list | None = None,
        max_string_length: int | None = None,
        max_items: int | None = None,
    ) -> JsonConstraint:
        """The constraint for a (prepared or plain) model of a family. Bounds not given are sized from the training
        targets (`examples`): twice the longest string (at least 16) and twice the longest list (at least 4); with
        no targets known, 64 characters and 16 items."""
        if max_string_length is None:
            max_string_length = max(16, 2 * longest_string(examples)) if examples else 64
        if max_items is None:
            max_items = max(4, 2 * longest_list(examples)) if examples else 16
        return cls(
            processor.tokenizer,
            vocab_size=output_vocab_size(model),
            stop_token_ids=family.stop_token_ids(processor),
            skeleton=skeleton,
            examples=examples,
            max_string_length=max_string_length,
            max_items=max_items,
        )

    def logits_processor(self):
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.grammar)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (the logits' width, which can exceed the tokenizer's length)."""
    return model.get_output_embeddings().weight.shape[0]
