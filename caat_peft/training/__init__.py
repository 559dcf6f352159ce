"""Training: the step that reads as the method, gradient reduction, and the run loop."""

from caat_peft.training.step import training_step
from caat_peft.training.trainer import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train", "training_step"]
