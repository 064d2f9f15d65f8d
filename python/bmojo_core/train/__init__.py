"""Training: learning-rate schedules (:mod:`.schedules`: GreedyLR, cosine) and a
model-agnostic trainer with evaluation helpers (:mod:`.loop`)."""

from .loop import IGNORE_INDEX, evaluate, negative_flip_rate, train
from .schedules import GreedyLR, cosine_schedule

__all__ = ["IGNORE_INDEX", "GreedyLR", "cosine_schedule", "evaluate", "negative_flip_rate", "train"]
