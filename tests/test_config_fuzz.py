"""Config fuzzing: every field of every method's config, given a wrong type or an out-of-range value, gives a
ConfigError that names it, or (when the value is legal) a training step that runs; never a crash from torch."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from spikeprune.config import ConfigError, load_config
from spikeprune.sparsity.methods import METHODS, list_methods, method_config
from spikeprune.train import Trainer

CONV_ONLY = {"sca", "l1_filter", "slimming", "random_channels"}  # channel pruning: a net with conv channels


def fields(name: str):
    cls = METHODS.get(name).Config
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def base(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union or type(None) in typing.get_args(tp) else tp


def wrong_type(tp):
    b = base(tp)
    if b is bool:
        return "yes"
    if b in (int, float):
        return "lots"
    if typing.get_origin(b) is typing.Literal:
        return "no-such-choice"
    if b is str:
        return 3
    return 12345  # lists, dicts


CASES = [(m, f, tp) for m in list_methods() for f, tp in fields(m)]


@pytest.mark.parametrize("method,field,tp", CASES, ids=[f"{m}.{f}" for m, f, _ in CASES])
def test_wrong_type_names_the_field(method, field, tp):
    with pytest.raises(ConfigError, match=rf"method\.{field}\b"):
        method_config({"name": method, field: wrong_type(tp)})


NUMERIC = [(m, f) for m, f, tp in CASES if base(tp) in (int, float)]


def run_one_step(tmp_path, method: str, field: str, value) -> None:
    model = "convnet" if method in CONV_ONLY else "fc3"
    opts = ("{channels: [4, 6], hidden: 16, image_size: 8}" if model == "convnet"
            else "{hidden: [24, 16], image_size: 8}")
    cfg = load_config(None, [
        f"out_dir={tmp_path}", "name=fuzz", f"model.name={model}", f"model.options={opts}", "model.T=2",
        "data.name=synthetic", "data.options={n: 16, in_shape: [1, 8, 8]}", "data.batch_size=8",
        "train.epochs=2", "train.max_steps_per_epoch=1", "train.progress=false", "measure.max_batches=1",
        "train.keep_checkpoints=1", f"method={{name: {method}, {field}: {value}}}"])
    Trainer(cfg, log=lambda *a, **k: None).fit()


@pytest.mark.parametrize("method,field", NUMERIC, ids=[f"{m}.{f}" for m, f in NUMERIC])
@pytest.mark.parametrize("value", [-1, 10**6])
def test_out_of_range_is_refused_or_harmless(tmp_path, method, field, value):
    try:
        method_config({"name": method, field: value})
    except ConfigError as e:
        assert f"method.{field}" in str(e)
        return
    try:
        run_one_step(tmp_path, method, field, value)
    except ConfigError as e:  # refused once the model is known (e.g. an option that needs a validation split)
        assert "method." in str(e)
