"""ACR, SimPro and the logit-adjusted labeled loss: their steps against naive formulas, and fits through the real
CLI on a generated archive (results, logged priors, kill-and-resume)."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

from ssl_kvasir.cli import main
from ssl_kvasir.methods import METHODS
from ssl_kvasir.models import build_network

C = 5
COUNTS = [8, 4, 2, 1, 1]


def _method(name: str, **extra):
    datamodule = SimpleNamespace(
        streams={
            "lb": SimpleNamespace(labels=np.repeat(np.arange(C), COUNTS)),
            "ulb": SimpleNamespace(rows=np.arange(40)),
        },
        num_classes=C,
        training_prior=np.array(COUNTS) / sum(COUNTS),  # a uniform sampler: the labeled set's shares
    )
    cls = METHODS[name]
    config = {**cls.data_kwargs(datamodule), **extra}
    module = cls.from_config(
        build_network("test_resnet", C), class_names=list("abcde"), max_steps=10, **config
    )
    module.configure_model()
    return module.train()


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "lb": {"weak": torch.randn(4, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 3, 4])},
        "ulb": {
            "weak": torch.randn(8, 3, 32, 32, generator=g),
            "strong": torch.randn(8, 3, 32, 32, generator=g),
            "pos": torch.arange(8),
            "label": torch.full((8,), -1),
        },
    }


def _naive_ce(logits: list[float], target: list[float]) -> float:
    """-sum_c target_c log softmax(logits)_c."""
    log_norm = math.log(sum(math.exp(v) for v in logits))
    return sum(t * (log_norm - v) for t, v in zip(target, logits, strict=True))


def _softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return [v / sum(e) for v in e]


def _one_hot(k: int) -> list[float]:
    return [float(c == k) for c in range(C)]


def test_supervised_logit_adjusted_loss_is_menon_et_al():
    module = _method("supervised", loss="logit_adjusted", la_tau=1.5)
    batch = _batch()
    loss = module.training_step(batch, 0)
    logits = module.model(batch["lb"]["weak"]).tolist()
    prior = [n / sum(COUNTS) for n in COUNTS]
    expected = np.mean(
        [
            _naive_ce([z + 1.5 * math.log(p) for z, p in zip(row, prior, strict=True)], _one_hot(int(y)))
            for row, y in zip(logits, batch["lb"]["label"], strict=True)
        ]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert _method("supervised").training_step(batch, 0).item() != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="unknown loss"):
        _method("supervised", loss="focal")


def test_self_training_honours_the_logit_adjusted_loss():
    """Round 0 (labeled images only) and the student rounds (labeled + pseudo-labeled) adjust the labeled loss
    by the training prior; the pseudo-labeled images keep plain (soft) cross-entropy."""
    module = _method("self_training", loss="logit_adjusted", la_tau=1.5, lambda_pl=0.5)
    batch = _batch()
    prior = [n / sum(COUNTS) for n in COUNTS]
    y = [int(v) for v in batch["lb"]["label"]]

    def adjusted(rows):
        return np.mean(
            [
                _naive_ce([z + 1.5 * math.log(p) for z, p in zip(row, prior, strict=True)], _one_hot(k))
                for row, k in zip(rows, y, strict=True)
            ]
        )

    lb_only = {"lb": batch["lb"]}
    loss = module.training_step(lb_only, 0)
    assert loss.item() == pytest.approx(adjusted(module.model(batch["lb"]["weak"]).tolist()), rel=1e-5)
    target = torch.softmax(torch.randn(4, C, generator=torch.Generator().manual_seed(1)), 1)
    with_pl = {**lb_only, "pl": {"strong": batch["ulb"]["strong"][:4], "target": target}}
    loss = module.training_step(with_pl, 0)
    with torch.no_grad():
        z_lb, z_pl = module.model(torch.cat([batch["lb"]["weak"], with_pl["pl"]["strong"]])).split([4, 4])
    soft = np.mean([_naive_ce(row, t) for row, t in zip(z_pl.tolist(), target.tolist(), strict=True)])
    assert loss.item() == pytest.approx(adjusted(z_lb.tolist()) + 0.5 * soft, rel=1e-4)
    assert _method("self_training", lambda_pl=0.5).training_step(lb_only, 0).item() != pytest.approx(
        adjusted(module.model(batch["lb"]["weak"]).tolist()), rel=1e-3
    )


@pytest.mark.parametrize("sampler", ["uniform", "class_balanced"])
def test_logit_adjustment_follows_the_labeled_stream_as_sampled(synth_archive, sampler):
    """The class-balanced sampler makes the labeled stream uniform: logit adjustment by the training prior is then
    a constant shift of the logits, the loss is plain cross-entropy and no decision moves. Under the uniform
    sampler it adjusts by the labeled set's long tail (log 3 between its largest and smallest class here)."""
    from dataclasses import replace

    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.data.datamodule import KvasirDataModule
    from ssl_kvasir.data.splits import make_split

    catalog = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv")
    split = make_split(catalog, eval_fold=0, seed=0)
    labels = catalog.images.label.to_numpy()
    # 1, 2 or 3 labeled images per class: a tail of ratio 3 over all 23 classes.
    rows = np.concatenate([split.labeled[labels[split.labeled] == c][: 1 + c % 3] for c in range(23)])
    dm = KvasirDataModule(
        catalog, replace(split, labeled=rows), image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, sampler=sampler
    )
    cls = METHODS["supervised"]
    module = cls.from_config(
        build_network("test_resnet", 23),
        class_names=catalog.classes.names,
        max_steps=10,
        loss="logit_adjusted",
        la_tau=1.0,
        **cls.data_kwargs(dm),
    )
    offset = module.labeled_prior.log()  # (C,) what the adjustment adds to the logits
    z = torch.randn(64, 23, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.arange(64) % 23
    loss = module.labeled_loss(z, y)
    (grad,) = torch.autograd.grad(loss, z)
    (grad_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    if sampler == "class_balanced":
        assert torch.allclose(offset, offset[0].expand(23))
        assert torch.equal((z + offset).argmax(1), z.argmax(1))
        assert loss.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
        assert torch.allclose(grad, grad_ce, atol=1e-7)
    else:
        assert (offset.max() - offset.min()).item() == pytest.approx(math.log(3), rel=1e-5)
        assert not torch.allclose(grad, grad_ce, atol=1e-4)


# The reference code's form; SimPro's defaults (the config file's).
REFERENCE_FORM = {"scale_labeled_loss": True, "em_posteriors": "confident", "em_warmup_steps": 0}


@pytest.mark.parametrize("form", ["default", "reference"])
def test_simpro_step_matches_the_naive_em_losses(form):
    """Posterior under pi_u, soft targets above the threshold, losses adjusted by the training prior; the
    reference form scales the labeled loss by mu |L| / |U| and its M-step sums only the confident posteriors."""
    reference = form == "reference"
    extra = REFERENCE_FORM if reference else {}
    module = _method("simpro", loss="logit_adjusted", la_tau=2.0, threshold=0.3, **extra)
    # A prior state as after some epochs, so that both adjustments matter.
    module.prior.unlabeled_prior.copy_(torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3]))
    module.prior.train_prior.copy_(torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1]))
    batch = _batch(1)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        z_lb, z_w, z_s = (t.tolist() for t in module.model(x).split([4, 8, 8]))
    pi_u, pi = module.prior.unlabeled_prior.tolist(), module.prior.train_prior.tolist()
    loss_x = np.mean(
        [
            _naive_ce([v + 2 * math.log(p) for v, p in zip(row, pi, strict=True)], _one_hot(int(y)))
            for row, y in zip(z_lb, batch["lb"]["label"], strict=True)
        ]
    )
    if reference:
        loss_x *= (8 * sum(COUNTS)) / (4 * 40)  # n_ulb |L| / (n_lb |U|)
    terms, masses = [], np.zeros(C)
    for w, s in zip(z_w, z_s, strict=True):
        q = _softmax([v + 2 * math.log(p) for v, p in zip(w, pi_u, strict=True)])
        keep = max(q) >= 0.3
        masses += np.array(q) * (keep if reference else 1.0)
        terms.append(keep * _naive_ce([v + 2 * math.log(p) for v, p in zip(s, pi, strict=True)], q))
    assert loss.item() == pytest.approx(loss_x + np.mean(terms), rel=1e-4)
    np.testing.assert_allclose(module.prior.unlabeled_mass.numpy(), masses, rtol=1e-5)
    assert module.prior.labeled_seen.tolist() == [1, 1, 0, 1, 1]


@pytest.mark.parametrize("ratio", [30, 300])
def test_simpro_keeps_its_label_anchor_at_hyperkvasir_ratios(ratio):
    """With an unlabeled pool 30 or 300 times the labeled set, the default labeled loss keeps its full weight;
    the reference form's scale mu |L| / |U| would leave it 2 / ratio of it (mu 2 in this batch)."""
    pool = ratio * sum(COUNTS)
    batch = _batch(3)
    default = _method("simpro", num_unlabeled=pool, threshold=1.0)  # threshold 1: no pseudo-label counts
    scaled = _method("simpro", num_unlabeled=pool, threshold=1.0, **REFERENCE_FORM)
    scaled.load_state_dict(default.state_dict())
    loss, loss_scaled = default.training_step(batch, 0), scaled.training_step(batch, 0)
    # One forward pass over the three batches, as the step makes it (BatchNorm sees them together).
    x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
    logits_lb = default.model(x)[:4]
    full = default.labeled_loss(logits_lb, batch["lb"]["label"], default.prior.train_prior)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    assert loss_scaled.item() == pytest.approx(full.item() * 2 / ratio, rel=1e-4)


def test_acr_step_matches_the_naive_two_head_losses_and_predicts_with_the_balanced_head():
    module = _method("acr", threshold=0.3, tau_balanced=2.0, tau_pseudo_balanced=1.0, est_epoch=-1)
    assert module.fit_warnings() == []  # a long-tailed training prior: ACR is not inert
    module.adjustment.tau.fill_(0.5)
    batch = _batch(2)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        x = torch.cat([batch["lb"]["weak"], batch["ulb"]["weak"], batch["ulb"]["strong"]])
        features = module.model.backbone(x)
        z_lb, z_w, z_s = (t.tolist() for t in module.model.head(features).split([4, 8, 8]))
        b_lb, b_w, b_s = (t.tolist() for t in module.balanced_head(features).split([4, 8, 8]))
    log_p = [math.log(n / sum(COUNTS)) for n in COUNTS]
    y = [int(v) for v in batch["lb"]["label"]]
    loss_x = np.mean([_naive_ce(row, _one_hot(k)) for row, k in zip(z_lb, y, strict=True)])
    loss_x_b = np.mean(
        [
            _naive_ce([v + 2 * lp for v, lp in zip(row, log_p, strict=True)], _one_hot(k))
            for row, k in zip(b_lb, y, strict=True)
        ]
    )
    loss_u, loss_u_b, hist = [], [], np.zeros(C)
    for w, wb, s, sb in zip(z_w, b_w, z_s, b_s, strict=True):
        adjusted = _softmax([v - 0.5 * lp for v, lp in zip(w, log_p, strict=True)])
        keep = max(adjusted) >= 0.3 or max(_softmax(w)) >= 0.3
        loss_u.append(keep * _naive_ce(s, _one_hot(int(np.argmax(adjusted)))))
        adjusted_b = _softmax([v - 1.0 * lp for v, lp in zip(w, log_p, strict=True)])
        keep_b = max(adjusted_b) >= 0.3 or max(_softmax(wb)) >= 0.3
        loss_u_b.append(keep_b * _naive_ce(sb, _one_hot(int(np.argmax(adjusted_b)))))
        if max(_softmax(wb)) >= 0.3:
            hist[int(np.argmax(wb))] = 1  # mix_estimate=reference: a class counts once per step
    expected = loss_x + loss_x_b + np.mean(loss_u) + np.mean(loss_u_b)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # The step's confident balanced predictions moved the estimate: p_u = 0.99 * uniform + 0.01 * their classes.
    expected_prior = 0.99 * np.full(C, 1 / C) + 0.01 * hist / hist.sum()
    np.testing.assert_allclose(module.adjustment.unlabeled_prior.numpy(), expected_prior, rtol=1e-5)
    loss.backward()
    assert module.balanced_head.weight.grad is not None and module.balanced_head.weight.grad.abs().sum() > 0
    # The balanced head is averaged by the EMA and is the one that predicts.
    assert set(module.trainable_modules()) == {"model", "balanced_head"}
    module.eval()
    with torch.no_grad():
        x = batch["lb"]["weak"]
        _, logits = module.predict_batch(x)
        ema = module.ema.module
        assert torch.allclose(logits, ema["balanced_head"](ema["model"].backbone(x)))


@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_priors_are_state_that_a_checkpoint_restores(name, tmp_path):
    module = _method(name)
    state = module.adjustment if name == "acr" else module.prior
    state.unlabeled_prior.copy_(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]))
    torch.save(module.state_dict(), tmp_path / "state.pt")
    fresh = _method(name)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.unlabeled_prior == pytest.approx({"a": 0.5, "b": 0.2, "c": 0.1, "d": 0.1, "e": 0.1})


TINY = tiny("trainer.max_steps=6", "data.val_fraction=0.2")
# Every pseudo-label counts (ACR: from the second epoch on), so that the priors move within a few steps.
EAGER = {
    "acr": ["method.threshold=0.0", "method.est_epoch=0"],
    "simpro": ["method.threshold=0.0", "method.em_warmup_steps=0"],
}


def _data(archive) -> list[str]:
    return [f"data.root={archive}", f"data.split_file={archive / '2_fold_split.csv'}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_fit_writes_and_logs_the_unlabeled_prior(synth_archive, tmp_path, name, capsys):
    out = tmp_path / name
    assert (
        main(["fit", f"method={name}", f"output_dir={out}", *_data(synth_archive), *TINY, *EAGER[name]]) == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == name and r["metrics"]["macro_f1"] >= 0
    # The generated archive is balanced: ACR's training prior is uniform and it says once that it is inert.
    printed = "".join(capsys.readouterr())
    if name == "acr":
        assert len(r["warnings"]) == 1 and "acr is inert" in r["warnings"][0]
        assert printed.count("acr is inert") == 1
    else:
        assert r["warnings"] == [] and "inert" not in printed
    prior = r["unlabeled_prior"]
    assert list(prior) == r["classes"] and len(prior) == 23
    assert sum(prior.values()) == pytest.approx(1.0, abs=1e-5) and min(prior.values()) >= 0
    # Logged at every epoch start; after an epoch of pseudo-labels the estimate has left the uniform start.
    with (out / "logs" / "metrics.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(f"train/unlabeled_prior/{r['classes'][0]}")]
    assert len(rows) == 3  # 6 steps, 2 per epoch
    shares = [[float(row[f"train/unlabeled_prior/{c}"]) for c in r["classes"]] for row in rows]
    assert shares[0] == pytest.approx([1 / 23] * 23)
    assert shares[-1] != pytest.approx([1 / 23] * 23, abs=1e-4)
    assert sum(shares[-1]) == pytest.approx(1.0, abs=1e-5)

    # analyze sets the checkpoint's estimate beside the composition its classifier predicts for the unlabeled images.
    analysis = tmp_path / "analysis"
    args = [
        f"checkpoint={out / r['checkpoint']}",
        f"output_dir={analysis}",
        *_data(synth_archive),
        "data.num_workers=0",
    ]
    assert main(["analyze", *args, "umap.n_neighbors=5", "cluster.enabled=false"]) == 0
    compared = json.loads((analysis / "analysis.json").read_text())["unlabeled_prior"]
    from ssl_kvasir.analysis.embeddings import load_embeddings
    from ssl_kvasir.run.checkpoint import load_method

    assert compared["estimated"] == pytest.approx(load_method(out / r["checkpoint"]).unlabeled_prior)
    store = load_embeddings(analysis / "embeddings")
    predicted = np.bincount(np.asarray(store.probs)[store.labels < 0].argmax(1), minlength=23) / 60
    assert list(compared["predicted"].values()) == pytest.approx(predicted.tolist())
    tv = 0.5 * sum(abs(compared["estimated"][c] - compared["predicted"][c]) for c in r["classes"])
    assert (
        compared["total_variation"] == pytest.approx(tv) and (analysis / "unlabeled_prior.png").stat().st_size
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["acr", "simpro"])
def test_killed_fit_resumes_to_the_same_priors_and_results(synth_archive, tmp_path, name):
    """The priors' running sums live in the checkpoint and are folded in at epoch starts: a fit killed after its
    first checkpoint and started again ends with the weights, priors and metrics of an uninterrupted one."""
    import helpers as resume

    args = [f"method={name}", *EAGER[name]]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(out):
        return [
            *resume.fit_command(synth_archive, out)[:4],
            *_data(synth_archive),
            f"output_dir={out}",
            *tiny(*resume.FIT_ARGS, *args),
        ]

    resume.run_to_end(command(straight), tmp_path / "straight.log")
    step = resume.kill_after_first_checkpoint(command(killed), killed, tmp_path / "killed.log")
    assert 0 < step < resume.TOTAL_STEPS
    resume.run_to_end(command(killed), tmp_path / "killed.log")
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["metrics"] == a["metrics"] and b["confusion_matrix"] == a["confusion_matrix"]
    assert b["unlabeled_prior"] == a["unlabeled_prior"]
    sa, sb = resume.final_state(straight), resume.final_state(killed)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    # The priors moved during training (results.json holds those of the selected checkpoint, maybe an early one).
    (key,) = [k for k in sa if k.endswith(".unlabeled_prior")]
    assert not torch.allclose(sa[key], torch.full((23,), 1 / 23), atol=1e-4)


@pytest.mark.slow
def test_supervised_logit_adjusted_with_class_balanced_sampler_fits(synth_archive, tmp_path):
    out = tmp_path / "la"
    args = [
        "method=supervised",
        "method.loss=logit_adjusted",
        "method.la_tau=1.0",
        "data.sampler=class_balanced",
    ]
    assert main(["fit", *args, f"output_dir={out}", *_data(synth_archive), *TINY]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (
        r["config"]["method"]["loss"] == "logit_adjusted"
        and r["config"]["data"]["sampler"] == "class_balanced"
    )
    assert r["unlabeled_prior"] is None
    assert np.array(r["confusion_matrix"]).sum() == r["n_test"]


def test_logit_adjusted_gradient_matches_autograd_free_formula():
    """d/dz of the adjusted CE is softmax(z + tau log pi) - onehot(y): the offset shifts the gradient."""
    z = torch.randn(3, C, requires_grad=True)
    y = torch.tensor([0, 2, 4])
    prior = torch.tensor(COUNTS, dtype=torch.float)
    from ssl_kvasir.losses import logit_adjusted_cross_entropy

    logit_adjusted_cross_entropy(z, y, prior, tau=1.0, reduction="sum").backward()
    expected = F.softmax(z.detach() + (prior / prior.sum()).log(), 1) - F.one_hot(y, C)
    assert torch.allclose(z.grad, expected, atol=1e-6)
