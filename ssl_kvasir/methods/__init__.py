"""Training methods as LightningModules, by name."""

from ssl_kvasir.methods.base import BaseMethod, TrainingDiverged
from ssl_kvasir.methods.fixmatch import FixMatch
from ssl_kvasir.methods.self_training import SelfTraining
from ssl_kvasir.methods.supervised import Supervised

METHODS: dict[str, type[BaseMethod]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "self_training": SelfTraining,
}

__all__ = ["METHODS", "BaseMethod", "FixMatch", "SelfTraining", "Supervised", "TrainingDiverged"]
