"""Networks from timm backbones: one backbone, or several composed into an ensemble.

Every backbone comes from ``timm.create_model(name, num_classes=0)`` and is used only through timm's contract
(``num_features``, the pooled features of ``forward``, ``resolve_model_data_config``), so any timm name works
and no code branches on a backbone's name. A name with ``+`` (``resnet152+densenet161``) composes several
backbones: their pooled features are concatenated, and the head decides how they are combined:

- ``linear``: one linear layer over all features (the default for one backbone);
- ``averaged``: one linear layer per part, logits averaged (the paper's "ResNet-152 + DenseNet-161 averaged",
  both trained together through the loss of the averaged output);
- ``mlp``: one linear layer per part, then an MLP over the concatenated per-part logits (the paper's
  "ResNet-152 + DenseNet-161 + MLP").
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.names import HEADS


def _timm_backbone(name: str, pretrained: bool, drop_path_rate: float) -> nn.Module:
    """A headless timm model. timm's own ``drop_rate`` stays 0: even without a classifier
    (``num_classes=0``) timm applies that dropout to the pooled features, and the head of
    :func:`build_network` applies ``drop_rate`` once more, so a dropout of 0.5 would drop 75 % of them."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ConfigError(
            f"unknown backbone {name!r}; timm has {len(timm.list_models())} models"
            + (f", e.g. {', '.join(close)}" if close else "")
            + " (timm.list_models() lists them all)"
        )
    kwargs: dict[str, Any] = {"num_classes": 0}  # passed on to the model's constructor
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone {name!r} does not take {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise ConfigError(
            f"could not get pretrained weights for {name!r} from the hub ({type(e).__name__}: {e}); "
            "offline, pass a local file with backbone.weights=PATH and backbone.pretrained=false"
        ) from None


def feature_dim(backbone: nn.Module) -> int:
    """Width of a headless timm model's pooled output: ``head_hidden_size`` where the model has a pre-logits
    layer after pooling (MobileNetV3, ...), else ``num_features``."""
    # nn.Module types an attribute it does not declare as Tensor | Module; timm's are ints.
    return cast(int, getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class MultiBackbone(nn.Module):
    """Several backbones side by side; features are concatenated in the order given."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.part_dims = [feature_dim(p) for p in parts]
        self.num_features = sum(self.part_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=1)  # (B, sum D_i)


class PartsHead(nn.Module):
    """One linear classifier per part of the features, combined by averaging or by an MLP."""

    def __init__(
        self,
        part_dims: Sequence[int],
        num_classes: int,
        combine: str,
        hidden: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.part_dims = list(part_dims)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in part_dims)
        self.combine = combine
        if combine == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(num_classes * len(part_dims), hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(self.dropout(features), self.part_dims, dim=1)
        logits = [head(f) for head, f in zip(self.heads, chunks, strict=True)]  # each (B, C)
        if self.combine == "averaged":
            return torch.stack(logits).mean(0)  # (B, C)
        return self.mlp(torch.cat(logits, dim=1))  # (B, C)


class Network(nn.Module):
    """Backbone + head. ``forward`` gives logits; ``features_and_logits`` gives both.

    Attributes:
        spec: the arguments of :func:`build_network`, stored in checkpoints to rebuild the network.
        data_config: timm's data config of the (first) backbone: input size, mean, std.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: dict, data_config: dict):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.spec, self.data_config = spec, data_config

    @property
    def num_features(self) -> int:
        return feature_dim(self.backbone)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)  # (B, D)
        return features, self.head(features)  # (B, D), (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, C)


def build_network(
    name: str,
    num_classes: int,
    head: str = "linear",
    pretrained: bool = False,
    weights: str | Sequence[str] | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    mlp_hidden: int = 256,
) -> Network:
    """A classifier over one timm backbone, or an ensemble of several (``name`` joined by ``+``).

    Args:
        name: a timm model name, or several joined by ``+``.
        num_classes: outputs of the head.
        head: ``linear``, ``averaged`` or ``mlp`` (see the module docstring).
        pretrained: load timm's ImageNet weights from the hub (needs the internet).
        weights: local weight file(s), one per part, loaded into the backbone(s) with a key check.
        drop_rate: dropout on the pooled features, before the classifier (applied once, in the head).
        drop_path_rate: stochastic depth, where the architecture has it.
        mlp_hidden: hidden width of the ``mlp`` head.
    """
    import timm.data

    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    names = [n.strip() for n in name.split("+")]
    parts = [_timm_backbone(n, pretrained, drop_path_rate) for n in names]
    if weights:
        files = [weights] if isinstance(weights, str | Path) else list(weights)
        if len(files) != len(parts):
            raise ConfigError(
                f"backbone {name!r} has {len(parts)} parts but {len(files)} weight files were given"
            )
        for part, part_name, f in zip(parts, names, files, strict=True):
            load_weights(part, Path(f), part_name)
    data_config = timm.data.resolve_model_data_config(parts[0])
    spec = {
        "name": name,
        "num_classes": num_classes,
        "head": head,
        "drop_rate": drop_rate,
        "drop_path_rate": drop_path_rate,
        "mlp_hidden": mlp_hidden,
    }
    backbone = parts[0] if len(parts) == 1 else MultiBackbone(parts)
    if head == "linear":
        classifier: nn.Module = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(feature_dim(backbone), num_classes)
        )
    else:
        part_dims = getattr(backbone, "part_dims", [feature_dim(backbone)])
        classifier = PartsHead(part_dims, num_classes, head, mlp_hidden, drop_rate)
    return Network(backbone, classifier, spec, data_config)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))  # what the file holds: checked below
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused Python object: bytes that are no tensor pickle
            raise ConfigError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
        # Not torch's advice to load it with weights_only=False: unpickling an object can run any code.
        raise ConfigError(
            f"weights file {path} holds not only tensors but pickled Python objects, which are never loaded "
            "(unpickling can run code); save the tensors alone: torch.save(model.state_dict(), FILE)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict of tensors")
    # Checkpoints of wrapped models prefix every key; strip one common wrapper prefix.
    for prefix in ("module.", "model.", "backbone."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """Load a local weight file into a timm backbone, checking that the keys and shapes fit.

    Classifier weights in the file (keys the headless backbone does not have) are ignored; a file whose
    backbone keys do not fit raises :class:`ConfigError` listing what is missing or mismatched.
    """
    state = _read_state_dict(Path(path))
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} of {len(own)} keys missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            detail.append(f"{len(mismatched)} shapes differ (e.g. {'; '.join(mismatched[:3])})")
        raise ConfigError(f"weights file {path} does not fit backbone {name!r}: " + "; ".join(detail))
    backbone.load_state_dict({k: state[k] for k in own})
