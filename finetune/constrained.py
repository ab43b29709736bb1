"""Schema-constrained decoding: generation that can only produce JSON of the recipe's shape.

The JSON Schema comes from the prompt skeleton (`finetune.metrics.schema_from_skeleton`: every skeleton key
required, no other keys, leaves typed and nullable). xgrammar compiles it against the tokenizer once and masks,
at every generation step, the tokens that would leave the grammar; its transformers `LogitsProcessor` does the
masking inside `model.generate`.

Two bounds make "always parseable" hold within a token budget, also for a model that has not learned anything:
strings get a `maxLength` and numbers a range (a grammar with unbounded strings lets a confused model write one
string until `max_new_tokens` runs out). The bounds apply to decoding only, not to the schema that scores
conformance. Separators are the compact ones our training targets use (`,` and `:`), so the grammar allows
exactly the formatting the model was trained to write.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from finetune.metrics import schema_from_skeleton

# Numbers the grammar allows while decoding; xgrammar turns a range into a bounded digit grammar.
NUMBER_BOUND = 1e12


def longest_string(values) -> int:
    """Length of the longest string anywhere inside the given JSON values (to size `maxLength`)."""
    longest = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            longest = max(longest, len(value))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return longest


def decoding_schema(skeleton: dict, max_string_length: int) -> dict:
    """The skeleton's schema with every string bounded to `max_string_length` characters and every number to
    ±NUMBER_BOUND."""
    schema = copy.deepcopy(schema_from_skeleton(skeleton))

    def bound(node: Any) -> None:
        if isinstance(node, dict):
            kinds = node.get("type")
            kinds = kinds if isinstance(kinds, list) else [kinds]
            if "string" in kinds:
                node["maxLength"] = max_string_length
            if "number" in kinds or "integer" in kinds:
                node.update(minimum=-NUMBER_BOUND, maximum=NUMBER_BOUND)
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

    def __init__(self, tokenizer, *, vocab_size: int, stop_token_ids: list[int], skeleton: dict,
                 max_string_length: int):
        import xgrammar as xgr  # optional at import time: only constrained runs need it

        self.schema = decoding_schema(skeleton, max_string_length)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.grammar = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(self.schema), any_whitespace=False, separators=(",", ":"))

    def logits_processor(self):
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.grammar)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (the logits' width, which can exceed the tokenizer's length)."""
    return model.get_output_embeddings().weight.shape[0]
