"""Tiny byte-level BPE tokenizers trained offline, for the tiny test / quickstart checkpoints.

Byte-level, so any text (any unicode) round-trips; few merges, so digits and letters stay close to one token
per character, which is what a tiny model learning to read from scratch needs.
"""

from __future__ import annotations

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
