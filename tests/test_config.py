"""Each method setting declared once: its YAML holds the default, ``config.RULES`` its check, the constructor takes
it without a default of its own; the registries, the config files and the allowed values agree."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

from ssl_kvasir import names
from ssl_kvasir.config import RULES, Choice, config_dir, method_defaults, method_names
from ssl_kvasir.methods import METHODS, BaseMethod
from ssl_kvasir.models import build_network

# Constructor arguments that come from the data and the run, not from the method's YAML.
FACTS = {"network", "class_names", "labeled_class_counts", "num_unlabeled", "max_steps", "seed"}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(name: str) -> dict:
    """What the run layer hands the constructor of ``name``: its YAML's settings and the data's facts."""
    cls = METHODS[name]
    datamodule = SimpleNamespace(
        streams={"lb": SimpleNamespace(labels=np.arange(3)), "ulb": SimpleNamespace(rows=np.arange(6))},
        num_classes=3,
        training_prior=np.full(3, 1 / 3),
    )
    return {
        **cls.config_defaults(),
        **cls.data_kwargs(datamodule),
        "class_names": list("abc"),
        "max_steps": 10,
    }


def test_the_registry_and_the_config_files_name_the_same_methods():
    assert sorted(METHODS) == method_names()
    assert all(METHODS[name].name == name for name in METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_setting_of_a_method_config_has_a_check(name):
    unchecked = [k for k in _flatten(method_defaults(name)) if f"method.{k}" not in RULES and k != "name"]
    assert unchecked == []


def test_every_method_check_is_a_setting_of_some_method():
    used = {f"method.{k}" for name in METHODS for k in _flatten(method_defaults(name))}
    assert sorted(k for k in RULES if k.startswith("method.") and k not in used) == []


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_constructor_takes_exactly_the_yaml_settings(name):
    """Built from its YAML alone it works; without any one setting it fails (no default hides in the code); an
    unknown setting is refused."""
    cls = METHODS[name]
    network = build_network("test_resnet", 3)
    settings = _settings(name)
    cls(network=network, **cls.strategies(settings))
    for key in cls.config_defaults():
        missing = {k: v for k, v in settings.items() if k != key}
        with pytest.raises((TypeError, KeyError)):
            cls(network=network, **cls.strategies(missing))
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(network=network, **cls.strategies({**settings, "not_a_setting": 1}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_signature_default_but_the_data_facts(name):
    """Defaults live in the YAML; a constructor default may only stand for a fact of the data or the run."""
    defaults = {
        p.name: p.default
        for klass in METHODS[name].__mro__
        if issubclass(klass, BaseMethod)
        for p in inspect.signature(klass.__init__).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    assert set(defaults) <= FACTS
    yaml = method_defaults(name)
    assert [k for k in defaults if k in yaml and yaml[k] != defaults[k]] == []


def test_the_enumerated_settings_are_checked_against_names():
    for key, values in {
        "method.optimizer": names.OPTIMIZERS,
        "method.schedule": names.SCHEDULES,
        "method.eval_weights": names.EVAL_WEIGHTS,
        "method.loss": names.LABELED_LOSSES,
        "method.teacher": names.TEACHERS,
        "method.masking": names.MASKINGS,
        "method.alignment": names.ALIGNMENTS,
        "method.pseudo.balance": names.BALANCES,
        "data.val_policy": names.VAL_POLICIES,
        "data.strong_policy": names.STRONG_POLICIES,
        "data.sampler": names.SAMPLERS,
        "backbone.head": names.HEADS,
    }.items():
        rule = RULES[key]
        assert isinstance(rule, Choice) and rule.values is values, key


def test_method_defaults_is_what_hydra_composes():
    from omegaconf import OmegaConf

    from ssl_kvasir.config import compose

    for name in METHODS:
        composed = OmegaConf.to_container(compose("fit", [f"method={name}"]).method, resolve=True)
        assert method_defaults(name) == composed, name


def test_method_defaults_of_a_missing_file_names_it():
    from ssl_kvasir.errors import ConfigError

    with pytest.raises(ConfigError, match=str(config_dir() / "method" / "nothing.yaml")):
        method_defaults("nothing")
