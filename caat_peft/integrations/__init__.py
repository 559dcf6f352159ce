"""CA-AT in other people's training frameworks.

``caat_peft.integrations.hf_trainer`` holds :class:`CAATTrainer`, a drop-in
``transformers.Trainer`` that trains adversarially with :class:`caat_peft.ConflictAware`.
It is imported on first use, so ``import caat_peft.integrations`` does not import
``transformers``.
"""

from __future__ import annotations

from typing import Any

_HF_NAMES = ("CAATTrainer", "CAATTrainingArguments", "PixelLogits")


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        from caat_peft.integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_HF_NAMES)
