"""Tiny byte-level BPE tokenizers trained offline, for the tiny test / quickstart checkpoints.

Byte-level, so any text (any unicode) round-trips; few merges, so digits and letters stay close to one token
per character, which is what a tiny model learning to read from scratch needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Text the merges are learned from: JSON punctuation and the key names documents typically use.
_CORPUS = [
    '{"invoice_number": "", "date": "", "seller": {"name": "", "address": ""}, "buyer": {"name": "", '
    '"address": ""}, "items": [{"description": "", "quantity": 0, "unit_price": "", "amount": ""}], '
    '"subtotal": "", "tax": "", "total": "", "currency": "", "store": "", "number": ""}',
    "Extract the details from the document image and structure them into JSON format:",
    "Invoice Receipt Total Subtotal Tax Date Seller Buyer Address Street Road Avenue",
]


def train_tiny_tokenizer(
    special_tokens: list[str], *, vocab_size: int = 320, extra_corpus: list[str] = (), **tokenizer_kwargs
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with the given special tokens (ids 0..n-1 in order) and a byte-level BPE.

    `tokenizer_kwargs` go to the wrapper (e.g. `eos_token`, `pad_token`, `extra_special_tokens`).
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CORPUS) + list(extra_corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **tokenizer_kwargs)


def save_tiny_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path, **config: object) -> None:
    """Save in the old single-file layout (the chat template, if any, inside tokenizer_config.json) under the class
    name `PreTrainedTokenizerFast`, which transformers 4 and 5 both load without remote code; `config` updates
    tokenizer_config.json (e.g. add_bos_token=False, chat_template=...)."""
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    file = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(file.read_text())
    tok_cfg.pop("backend", None)
    tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", **config)
    file.write_text(json.dumps(tok_cfg, indent=2) + "\n")
