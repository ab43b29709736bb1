"""Ovis1.6-Gemma2 and Ovis2, loaded natively (see `family`)."""

from finetune.models.ovis.family import OvisFamily

__all__ = ["OvisFamily"]
