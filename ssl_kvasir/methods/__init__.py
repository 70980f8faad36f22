"""Training methods as LightningModules, by name."""

from ssl_kvasir.methods.acr import ACR
from ssl_kvasir.methods.base import BaseMethod, TrainingDiverged
from ssl_kvasir.methods.fixmatch import FixMatch
from ssl_kvasir.methods.freematch import FreeMatch
from ssl_kvasir.methods.knn_probe import KnnProbe
from ssl_kvasir.methods.linear_probe import LinearProbe
from ssl_kvasir.methods.mean_teacher import MeanTeacher
from ssl_kvasir.methods.pseudo_label import PseudoLabel
from ssl_kvasir.methods.self_training import SelfTraining
from ssl_kvasir.methods.simpro import SimPro
from ssl_kvasir.methods.softmatch import SoftMatch
from ssl_kvasir.methods.supervised import Supervised

METHODS: dict[str, type[BaseMethod]] = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "self_training": SelfTraining,
    "acr": ACR,
    "simpro": SimPro,
    "pseudo_label": PseudoLabel,
    "mean_teacher": MeanTeacher,
    "freematch": FreeMatch,
    "softmatch": SoftMatch,
    "linear_probe": LinearProbe,
    "knn_probe": KnnProbe,
}

__all__ = [
    "ACR",
    "METHODS",
    "BaseMethod",
    "FixMatch",
    "FreeMatch",
    "KnnProbe",
    "LinearProbe",
    "MeanTeacher",
    "PseudoLabel",
    "SelfTraining",
    "SimPro",
    "SoftMatch",
    "Supervised",
    "TrainingDiverged",
]
