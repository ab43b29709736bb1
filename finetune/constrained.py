"""Schema-constrained decoding: generation that can only produce JSON of the recipe's shape.

The JSON Schema comes from the prompt skeleton refined by the training targets (`finetune.schema`: keys every
target has are required, no other keys, leaf types as seen, nullable). xgrammar compiles it against the tokenizer
once and masks, at every generation step, the tokens that would leave the grammar (`GrammarLogitsProcessor`, inside
`model.generate`).

Bounds make "always parseable" hold within a token budget, also for a model that has not learned anything:
strings get a maximum length, numbers a range and lists a maximum number of items (a grammar with unbounded
strings lets a confused model write one string until `max_new_tokens` runs out). `max_new_tokens` must still
cover the longest answer the bounds allow: `answer_token_budget` estimates it and `fit_token_budget` raises the
default or warns (below). The bounds apply to decoding only, not to the schema that scores conformance.

A training run saves the answer schema and its bounds with every model folder (`prompt.json`, key `answer`:
`answer_record`), so that eval and predict decode and score a model with what it was trained on
(`trained_answer`); folders saved before carry no such key and keep the defaults. Separators are the compact ones
our training targets use (`,` and `:`), so the grammar allows exactly the formatting the model was trained to write.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from finetune.schema import schema_from_skeleton

# Numbers the grammar allows while decoding; xgrammar turns a range into a bounded digit grammar.
NUMBER_BOUND = 1e12
# Bounds when no training targets are known.
DEFAULT_MAX_STRING_LENGTH, DEFAULT_MAX_ITEMS = 64, 16
# max_new_tokens when none is given, and the most `fit_token_budget` raises it to.
DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP = 512, 4096
# Characters a number takes at most in the estimate: sign, 13 digits, point and fraction digits, exponent.
NUMBER_CHARS = 32
# What a string character can be: ASCII, accented and CJK letters, symbols, characters outside the BMP (4 UTF-8
# bytes: a byte-level tokenizer may spend a token on each) and the escapes the grammar allows (one unit each).
PROBE_CHARACTERS = [chr(c) for c in range(32, 127)] + list("éßøœ€£¥§°±µ¶ąłşžЖжΩω中文字日本語한국어ไทยالعربية")
PROBE_CHARACTERS += ["\U0001d11e", "\U00010348", "\U0001f9ff", "\U0002a6d6", "\U000e0041"]
PROBE_CHARACTERS += ['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"]


def default_bounds(
    examples: list | None, *, max_string_length: int | None = None, max_items: int | None = None
) -> tuple[int, int]:
    """(max_string_length, max_items): the given ones, else sized from the training targets (`examples`): twice the
    longest string (at least 16) and twice the longest list (at least 4); with no targets known, 64 and 16."""
    if max_string_length is None:
        max_string_length = max(16, 2 * longest_string(examples)) if examples else DEFAULT_MAX_STRING_LENGTH
    if max_items is None:
        max_items = max(4, 2 * longest_list(examples)) if examples else DEFAULT_MAX_ITEMS
    return max_string_length, max_items


def answer_record(schema: dict, max_string_length: int, max_items: int) -> dict:
    """What a model folder keeps of its answers (prompt.json `answer`): the answer schema scoring conformance and
    the decoding bounds."""
    return {"schema": schema, "max_string_length": max_string_length, "max_items": max_items}


def trained_answer(prompt: dict | None) -> dict | None:
    """The `answer` record of a model folder's prompt.json, or None (a folder saved before it was kept)."""
    answer = (prompt or {}).get("answer")
    if not isinstance(answer, dict) or not isinstance(answer.get("schema"), dict):
        return None
    for key in ("max_string_length", "max_items"):
        if not isinstance(answer.get(key), int) or isinstance(answer.get(key), bool) or answer[key] < 1:
            return None
    return answer


def longest_answer_units(schema: dict, max_string_length: int, max_items: int) -> int:
    """Characters of the longest compact JSON the bounded schema allows (an escape in a string counts as one
    unit): every key present, every string at `max_string_length`, every list at `max_items`, numbers at
    NUMBER_CHARS; a node allowing several types takes the longest."""
    kinds = schema.get("type", ["string", "number", "boolean", "null"])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    sizes = [4]  # null
    if "object" in kinds:
        props = schema.get("properties") or {}
        body = sum(
            len(json.dumps(k, ensure_ascii=False)) + 1 + longest_answer_units(v, max_string_length, max_items)
            for k, v in props.items()
        )
        sizes.append(2 + body + max(0, len(props) - 1))
    if "array" in kinds:
        item = longest_answer_units(schema.get("items") or {}, max_string_length, max_items)
        sizes.append(2 + max_items * item + max(0, max_items - 1))
    if "string" in kinds:
        sizes.append(2 + max_string_length)
    if "number" in kinds or "integer" in kinds:
        sizes.append(NUMBER_CHARS)
    if "boolean" in kinds:
        sizes.append(5)
    return max(sizes)


def tokens_per_unit(tokenizer) -> int:
    """The most tokens this tokenizer spends on one character or escape of PROBE_CHARACTERS, encoded alone (a
    conservative figure: in context merges only make it fewer)."""
    counts = [len(tokenizer.encode(c, add_special_tokens=False)) for c in PROBE_CHARACTERS]
    return max(1, *counts)


def longest_answer_frame(schema: dict, max_string_length: int, max_items: int) -> tuple[str, int, int, int]:
    """The longest answer the bounded schema allows (the same choices as `longest_answer_units`), split into what
    the schema fixes and what the model chooses: (the compact JSON with every string `""` and every number left
    out, string characters, number characters, number of string / number slots)."""
    kinds = schema.get("type", ["string", "number", "boolean", "null"])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    options = [("null", 0, 0, 0)]
    if "object" in kinds:
        parts = [
            (json.dumps(k, ensure_ascii=False), longest_answer_frame(v, max_string_length, max_items))
            for k, v in (schema.get("properties") or {}).items()
        ]
        text = "{" + ",".join(f"{key}:{frame[0]}" for key, frame in parts) + "}"
        options.append((text, *(sum(frame[i] for _, frame in parts) for i in (1, 2, 3))))
    if "array" in kinds:
        item = longest_answer_frame(schema.get("items") or {}, max_string_length, max_items)
        options.append(("[" + ",".join([item[0]] * max_items) + "]", *(max_items * n for n in item[1:])))
    if "string" in kinds:
        options.append(('""', max_string_length, 0, 1))
    if "number" in kinds or "integer" in kinds:
        options.append(("", 0, NUMBER_CHARS, 1))
    if "boolean" in kinds:
        options.append(("false", 0, 0, 0))
    return max(options, key=lambda o: len(o[0]) + o[1] + o[2])


def answer_token_budget(schema: dict, tokenizer, *, max_string_length: int, max_items: int) -> int:
    """Tokens the longest answer the bounds allow may take, plus the end token: what the schema fixes (keys,
    brackets, quotes) as this tokenizer encodes it, every string character at `tokens_per_unit` (any character
    may come), every number character at the most a digit, sign, point or exponent takes, and two tokens per
    string or number for merges its content breaks at either end. Keys are counted as the tokenizer encodes
    them, not character by character: a list of objects repeats its keys `max_items` times."""
    frame, string_units, number_units, slots = longest_answer_frame(schema, max_string_length, max_items)
    fixed = len(tokenizer.encode(frame, add_special_tokens=False)) if frame else 0
    per_digit = max(len(tokenizer.encode(c, add_special_tokens=False)) for c in "0123456789-+.eE")
    return fixed + string_units * tokens_per_unit(tokenizer) + number_units * max(1, per_digit) + 2 * slots + 1


def fit_token_budget(requested: int | None, needed: int, *, say=None) -> int:
    """The max_new_tokens to generate with. Not given (`requested` None): DEFAULT_MAX_NEW_TOKENS, raised to `needed`
    (at most MAX_NEW_TOKENS_CAP) with one info line. Given: kept as it is, with a warning when below `needed`.
    Answers cut by the budget are reported as truncated (and scored as invalid) either way."""
    if say is None:
        from finetune.progress import info as say
    if requested is not None:
        if requested < needed:
            say(
                f"warning: --max-new-tokens {requested} may cut answers: the longest the decoding bounds allow "
                f"takes up to {needed} tokens of this tokenizer; cut answers are reported as truncated"
            )
        return requested
    if needed <= DEFAULT_MAX_NEW_TOKENS:
        return DEFAULT_MAX_NEW_TOKENS
    chosen = min(needed, MAX_NEW_TOKENS_CAP)
    capped = " (capped; longer answers are cut and reported as truncated)" if needed > chosen else ""
    say(
        f"max_new_tokens raised from {DEFAULT_MAX_NEW_TOKENS} to {chosen}: the longest answer the decoding bounds "
        f"allow takes up to {needed} tokens of this tokenizer{capped}"
    )
    return chosen


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


def decoding_schema(
    skeleton: dict,
    *,
    examples: list | None,
    max_string_length: int,
    max_items: int,
    answer_schema: dict | None = None,
) -> dict:
    """The answer schema (`answer_schema`, else `finetune.schema` from the skeleton and examples) with bounds for
    decoding: strings of at most `max_string_length` characters without raw control characters (xgrammar's
    length-bounded strings would let them through, and they are not valid JSON), numbers within ±NUMBER_BOUND,
    lists of at most `max_items` items."""
    schema = copy.deepcopy(answer_schema if answer_schema is not None else schema_from_skeleton(skeleton, examples))
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
        max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
        max_items: int = DEFAULT_MAX_ITEMS,
        answer_schema: dict | None = None,
    ):
        import xgrammar as xgr  # optional at import time: only constrained runs need it

        self.max_string_length, self.max_items = max_string_length, max_items
        self.schema = decoding_schema(
            skeleton,
            examples=examples,
            max_string_length=max_string_length,
            max_items=max_items,
            answer_schema=answer_schema,
        )
        # The longest answer the bounds allow, in tokens of this tokenizer (for max_new_tokens).
        self.token_budget = answer_token_budget(
            self.schema, tokenizer, max_string_length=max_string_length, max_items=max_items
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
        answer_schema: dict | None = None,
    ) -> JsonConstraint:
        """The constraint for a (prepared or plain) model of a family. Bounds not given: `default_bounds`."""
        max_string_length, max_items = default_bounds(
            examples, max_string_length=max_string_length, max_items=max_items
        )
        return cls(
            processor.tokenizer,
            vocab_size=output_vocab_size(model),
            stop_token_ids=family.stop_token_ids(processor),
            skeleton=skeleton,
            examples=examples,
            max_string_length=max_string_length,
            max_items=max_items,
            answer_schema=answer_schema,
        )

    def logits_processor(self) -> GrammarLogitsProcessor:
        """A processor for one `generate` call (its matchers follow that call's sequences)."""
        return GrammarLogitsProcessor(self.grammar)


class GrammarLogitsProcessor:
    """Masks, at every generation step, the tokens that would leave the grammar; one matcher per sequence.

    xgrammar's own transformers processor (`xgrammar.contrib.hf`) walks the batch in Python, reading each sequence's
    last token with `.item()` and filling its mask row by row, also for sequences that have finished: at batch 8 that
    cost 30% of the generated tokens/s on a 2-core CPU. Here the tokens come in one transfer, and xgrammar's
    `BatchGrammarMatcher` accepts them and fills the masks of the unfinished sequences only, on its C++ threads
    (which run between the model's forwards, when torch's threads are idle); the mask is applied to those rows only.
    """

    def __init__(self, grammar):
        import xgrammar as xgr

        self._xgr, self.grammar = xgr, grammar
        self.matchers: list = []
        self.batch = xgr.BatchGrammarMatcher()
        self.bitmask = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        xgr = self._xgr
        first_step = not self.matchers  # the prompt: no token generated yet to accept
        if first_step:
            self.matchers = [xgr.GrammarMatcher(self.grammar) for _ in range(input_ids.shape[0])]
            self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), self.grammar.tokenizer_info.vocab_size)
        active = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
        if not first_step and active:
            last = input_ids[:, -1].tolist()
            accepted = xgr.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[i] for i in active], [last[i] for i in active]
            )
            if not all(accepted):  # the mask allowed only tokens the grammar accepts: a bug, never a user error
                raise RuntimeError(f"grammar rejected a token it had allowed (sequences {active})")
            active = [i for i in active if not self.matchers[i].is_terminated()]
        if active:
            self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in active], self.bitmask, indices=active)
            bitmask = self.bitmask if scores.device.type == "cpu" else self.bitmask.to(scores.device)
            xgr.apply_token_bitmask_inplace(scores, bitmask, indices=active)
        return scores


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (the logits' width, which can exceed the tokenizer's length)."""
    return model.get_output_embeddings().weight.shape[0]
