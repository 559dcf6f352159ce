"""caat-peft: adversarial parameter-efficient fine-tuning with Conflict-Aware Adversarial Training."""

from caat_peft.gradients import combine_caat, combine_vanilla, conflict_stats

__version__ = "0.1.0"
__all__ = ["combine_caat", "combine_vanilla", "conflict_stats", "__version__"]
