"""The generic family for transformers-native VLMs (`model.family: auto`); see `family.py`."""

from finetune.models.auto.family import AutoFamily

__all__ = ["AutoFamily"]
