"""caat-peft: adversarial parameter-efficient fine-tuning with Conflict-Aware Adversarial Training."""

from caat_peft.gradients import combine_caat, combine_vanilla, conflict_stats

# Importing caat_peft.models also registers the bottleneck adapter with peft, so that
# PeftModel.from_pretrained loads adapters saved by caat-peft once caat_peft is imported.
from caat_peft.models import build_model
from caat_peft.training.conflict_aware import ConflictAware

__version__ = "0.1.0"
__all__ = [
    "ConflictAware",
    "build_model",
    "combine_caat",
    "combine_vanilla",
    "conflict_stats",
    "__version__",
]
