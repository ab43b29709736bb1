"""H2OVL-Mississippi: the family (`family`) and what it needs that transformers 5 lacks — the original checkpoint
layout (`config`, `checkpoint`), its image tiling (`image`, `processor`) and tiny offline checkpoints (`tiny`)."""

from finetune.models.mississippi.family import MississippiFamily

__all__ = ["MississippiFamily"]
