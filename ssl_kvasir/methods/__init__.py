"""Training methods as LightningModules, by name."""

from ssl_kvasir.methods.acr import ACR
from ssl_kvasir.methods.base import BaseMethod, TrainingDiverged
from ssl_kvasir.methods.fixmatch import FixMatch
from ssl_kvasir.methods.self_training import SelfTraining
from ssl_kvasir.methods.simpro import SimPro
from ssl_kvasir.methods.supervised import Supervised

METHODS: dict[str, type[BaseMethod]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "self_training": SelfTraining,
    "acr": ACR,
    "simpro": SimPro,
}

__all__ = [
    "ACR",
    "METHODS",
    "BaseMethod",
    "FixMatch",
    "SelfTraining",
    "SimPro",
    "Supervised",
    "TrainingDiverged",
]
