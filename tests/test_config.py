"""Strict YAML run configs (unknown keys, types, ranges, overrides) and the command line's error handling."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from spikeprune.cli import build_parser, main
from spikeprune.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------------------------------------- loading
def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.name == "run" and cfg.method is None
    assert cfg.train.optimizer == "adam" and cfg.train.lr == 0.001 and cfg.model.T == 4
    assert str(cfg.run_dir) == "runs/run"


def test_yaml_recipe_is_read_and_named_after_the_file(tmp_path):
    p = write(tmp_path, """
        model: {name: convnet, T: 2, neuron: {type: plif, init_tau: 3.0}, options: {hidden: 16}}
        data: {name: synthetic, batch_size: 8, val_split: 0.25, subset: 100}
        train:
          epochs: 3
          lr: 1e-2          # YAML 1.1 reads this as a string; it must still be a float
          weight_decay: 0   # an int where a float is expected
          optimizer: sgd
          grad_clip: 1.5
        measure: {pj_per_ac: 0.5}
    """, "my_run.yaml")
    cfg = load_config(p)
    assert cfg.name == "my_run"
    assert cfg.model == ModelConfig(name="convnet", T=2, neuron={"type": "plif", "init_tau": 3.0},
                                    options={"hidden": 16})
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.val_split, cfg.data.subset) == ("synthetic", 8, 0.25, 100)
    assert cfg.train.lr == 0.01 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float
    assert (cfg.train.epochs, cfg.train.optimizer, cfg.train.grad_clip) == (3, "sgd", 1.5)
    assert cfg.measure.pj_per_ac == 0.5 and cfg.measure.pj_per_mac == 4.6


def test_explicit_name_wins(tmp_path):
    assert load_config(write(tmp_path, "name: exp1\n")).name == "exp1"


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.train == TrainConfig() and cfg.name == "recipe"


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["model.T=6", "data.subset=10", "train.grad_clip=2"])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------------------- bad values
def error_of(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    return str(e.value)


@pytest.mark.parametrize("text, key", [
    ("train: {lrr: 0.1}", "train.lrr"),
    ("model: {name: fc3, tt: 2}", "model.tt"),
    ("bogus: 1", "bogus"),
    ("measure: {energy: 1}", "measure.energy"),
])
def test_unknown_key_names_it_and_lists_allowed(tmp_path, text, key):
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"unknown config key '{key}'")
    assert "allowed:" in msg
    if key == "train.lrr":
        assert " lr," in msg and "epochs" in msg


@pytest.mark.parametrize("text, expected", [
    ('train: {epochs: "ten"}', "config key 'train.epochs' must be an integer, got 'ten'"),
    ("train: {epochs: 2.5}", "config key 'train.epochs' must be an integer, got 2.5"),
    ("train: {epochs: true}", "config key 'train.epochs' must be an integer, got True"),
    ("train: {epochs: -1}", "config key 'train.epochs' must be >= 0, got -1"),
    ("train: {lr: abc}", "config key 'train.lr' must be a number, got 'abc'"),
    ("train: {lr: 0}", "config key 'train.lr' must be > 0, got 0.0"),
    ("train: {lr: .nan}", "config key 'train.lr' must be a finite number, got nan"),
    ("model: {T: 0}", "config key 'model.T' must be in [1, 10000], got 0"),
    ("data: {val_split: 1.5}", "config key 'data.val_split' must be in [0, 1), got 1.5"),
    ("data: {batch_size: 0}", "config key 'data.batch_size' must be >= 1, got 0"),
    ("data: {eval_batch_size: 0}", "config key 'data.eval_batch_size' must be >= 1, got 0"),
    ("data: {subset: 0}", "config key 'data.subset' must be >= 1 or null"),
    ("data: {subset: many}", "config key 'data.subset' must be an integer, got 'many'"),
    ("data: {root: 5}", "config key 'data.root' must be a string, got 5"),
    ("train: {optimizer: rmsprop}",
     "config key 'train.optimizer' must be one of ['sgd', 'adam', 'adamw'], got 'rmsprop'"),
    ("train: {scheduler: linear}",
     "config key 'train.scheduler' must be one of ['cosine', 'step', 'none'], got 'linear'"),
    ("model: {encoding: poisson}",
     "config key 'model.encoding' must be one of ['direct', 'rate', 'events'], got 'poisson'"),
    ("train: {nesterov: 1}", "config key 'train.nesterov' must be true or false, got 1"),
    ("train: {momentum: 1.0}", "config key 'train.momentum' must be in [0, 1), got 1.0"),
    ("train: {grad_clip: -1}", "config key 'train.grad_clip' must be > 0 or null"),
    ("train: {device: tpu}", "config key 'train.device' must be auto, cpu, cuda[:N] or mps, got 'tpu'"),
    ("train: {keep_checkpoints: 0}", "config key 'train.keep_checkpoints' must be >= 1"),
    ("train: {step_size: 0}", "config key 'train.step_size' must be >= 1, got 0"),
    ("train: {gamma: 0}", "config key 'train.gamma' must be > 0, got 0.0"),
    ("train: {tet_lambda: 2}", "config key 'train.tet_lambda' must be in [0, 1], got 2.0"),
    ("train: {checkpoint_every: -5}", "config key 'train.checkpoint_every' must be >= 0, got -5"),
    ("train: {max_steps_per_epoch: 0}", "config key 'train.max_steps_per_epoch' must be >= 1 or null"),
    ("measure: {pj_per_ac: -1}", "config key 'measure.pj_per_ac' must be >= 0, got -1.0"),
    ("measure: {pj_per_mac: -0.1}", "config key 'measure.pj_per_mac' must be >= 0, got -0.1"),
    ("measure: {max_batches: 0}", "config key 'measure.max_batches' must be >= 1 or null"),
    ("model: {neuron: lif}", "config key 'model.neuron' must be a mapping, got 'lif'"),
    ("model: {options: [1, 2]}", "config key 'model.options' must be a mapping, got [1, 2]"),
    ("train: 5", "config key 'train' must be a mapping, got int"),
    ("seed: one", "config key 'seed' must be an integer, got 'one'"),
])
def test_bad_value_error_names_key_and_allowed(tmp_path, text, expected):
    assert error_of(tmp_path, text) == expected


@pytest.mark.parametrize("neuron, fragment", [
    ("{type: lif, tau: 0.5}", "tau must be > 1"),
    ("{type: lif, v_threshold: 0}", "v_threshold must be > 0"),
    ("{type: hodgkin}", "unknown neuron 'hodgkin'"),
    ("{type: lif, surrogate: relu}", "unknown surrogate 'relu'"),
    ("{type: if, tau: 2.0}", "bad option for neuron 'if'"),
])
def test_neuron_options_are_checked_at_load_time(tmp_path, neuron, fragment):
    msg = error_of(tmp_path, f"model: {{neuron: {neuron}}}")
    assert msg.startswith("config key 'model.neuron' is invalid: ")
    assert fragment in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)  # a directory is not a config file
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(write(tmp_path, "train: {lr: [1, 2\n"))


# --------------------------------------------------------------------------------------------- overrides
def test_overrides_parse_as_yaml(tmp_path):
    p = write(tmp_path, "train: {lr: 0.1, epochs: 3}\ndata: {subset: 10}\n")
    cfg = load_config(p, ["train.lr=0.01", "train.epochs=5", "data.subset=null", "model.neuron={type: plif}",
                          "train.nesterov=true", "name=other", "train.device=cpu", "data.root="])
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 5 and cfg.data.subset is None
    assert cfg.model.neuron == {"type": "plif"} and cfg.train.nesterov is True
    assert cfg.name == "other" and cfg.train.device == "cpu" and cfg.data.root is None
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4


def test_apply_overrides_on_dicts():
    d = apply_overrides({"train": {"lr": 0.1}}, ["train.lr=0.01", "measure.pj_per_ac=0.5", "x.y.z=[1, 2]"])
    assert d == {"train": {"lr": 0.01}, "measure": {"pj_per_ac": 0.5}, "x": {"y": {"z": [1, 2]}}}
    assert apply_overrides({"method": None}, ["method.name=sca"]) == {"method": {"name": "sca"}}
    assert apply_overrides({"a": 1}, []) == {"a": 1}


def test_bad_overrides():
    with pytest.raises(ConfigError, match=r"override 'train\.lr' must look like key\.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"'lr' is not a section"):
        load_config(None, ["train.lr=0.1", "train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"config key 'train\.lr' must be a number, got 'abc'"):
        load_config(None, ["train.lr=abc"])


# ------------------------------------------------------------------------------------------------ method
def methods_or_skip():
    try:
        from spikeprune.sparsity import methods
    except ImportError as e:  # the methods package is written elsewhere
        pytest.skip(f"spikeprune.sparsity.methods does not import: {e}")
    return methods


def test_method_name_is_checked(tmp_path):
    methods_or_skip()
    try:
        msg = error_of(tmp_path, "method: {name: nope}")
    except ImportError as e:
        pytest.skip(f"a method module does not import: {e}")
    assert "method.name" in msg and "nope" in msg


def test_method_without_name():
    with pytest.raises(ConfigError, match=r"'method\.name' is missing"):
        load_config(None, ["method.kappa=0.2"])


def test_null_method_trains_densely():
    assert load_config(None, ["method=null"]).method is None


# --------------------------------------------------------------------------------------------------- CLI
COMMANDS = ["train", "eval", "measure", "compact", "compare", "list"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: spikeprune")
    for c in COMMANDS:
        assert f"\n  {c} " in out, c


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_command_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out and "--resume" in out
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_parser_collects_overrides():
    args = build_parser().parse_args(["train", "-c", "r.yaml", "--set", "train.lr=0.01", "-s", "model.T=2"])
    assert (args.command, args.config, args.set, args.resume) == ("train", "r.yaml", ["train.lr=0.01",
                                                                                       "model.T=2"], False)


def one_line_error(capsys, argv, expected_start: str) -> str:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith(expected_start), err
    return err


def test_train_with_bad_config_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPIKEPRUNE_DEBUG", raising=False)
    bad = write(tmp_path, "train: {lrr: 0.1}\n", "bad.yaml")
    one_line_error(capsys, ["train", "--config", str(bad)], "spikeprune train: error: unknown config key 'train.lrr'")
    good = write(tmp_path, "train: {epochs: 1}\n", "good.yaml")
    err = one_line_error(capsys, ["train", "--config", str(good), "--set", "train.optimizer=rmsprop"],
                         "spikeprune train: error: config key 'train.optimizer' must be one of")
    assert "['sgd', 'adam', 'adamw']" in err
    one_line_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")],
                   "spikeprune train: error: config file not found")
    one_line_error(capsys, ["compare", str(bad)], "spikeprune compare: error: unknown config key 'train.lrr'")


def test_debug_env_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKEPRUNE_DEBUG", "1")
    bad = write(tmp_path, "model: {T: 0}\n")
    with pytest.raises(ConfigError, match=r"'model\.T' must be in \[1, 10000\]"):
        main(["train", "--config", str(bad)])


def test_data_root_is_taken_literally(tmp_path):
    from spikeprune.cli import _load

    for root in ["/data/set #1", "null", "123", "[x]", "a: b"]:
        args = build_parser().parse_args(["train", "--data-root", root, "--set", "train.lr=0.01"])
        cfg = _load(args)
        assert cfg.data.root == root and cfg.train.lr == 0.01


def test_eval_of_a_missing_run_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPIKEPRUNE_DEBUG", raising=False)
    one_line_error(capsys, ["eval", str(tmp_path / "nope")], "spikeprune eval: error: ")


def test_list_prints_models_and_datasets(capsys):
    methods = methods_or_skip()
    try:
        names = methods.list_methods()
    except ImportError as e:
        pytest.skip(f"a method module does not import: {e}")
    from spikeprune.data import list_datasets
    from spikeprune.models import list_models

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "models:   " + ", ".join(list_models())
    assert lines[1] == "datasets: " + ", ".join(list_datasets())
    assert lines[2] == "methods:  " + ", ".join(names)
    assert {"fc3", "convnet"} <= set(lines[0].split(None, 1)[1].split(", "))
    assert "fashion_mnist" in lines[1]


def test_every_config_section_is_a_dataclass():
    # unknown-key checking relies on every section being a dataclass
    for f in dataclasses.fields(RunConfig):
        if f.name in ("model", "data", "train", "measure"):
            assert dataclasses.is_dataclass(f.default_factory())
    assert DataConfig().val_split == 0.0


def test_reuse_ignores_settings_that_cannot_change_results(tmp_path):
    import json

    from spikeprune.config import RunConfig, from_dict, to_dict
    from spikeprune.runs import finished_with as _finished_with

    cfg = from_dict(RunConfig, {"name": "r", "out_dir": str(tmp_path), "train": {"epochs": 3}})
    cfg.run_dir.mkdir(parents=True)
    assert not _finished_with(cfg)  # no results yet
    (cfg.run_dir / "results.json").write_text("{}")
    (cfg.run_dir / "model.pt").write_bytes(b"")
    stored = to_dict(cfg)
    stored["out_dir"] = "elsewhere"  # trained in another place, then moved here
    stored["train"]["progress"] = False
    stored["train"]["checkpoint_every"] = 50
    (cfg.run_dir / "config.json").write_text(json.dumps(stored))
    assert _finished_with(cfg)
    stored["train"]["epochs"] = 4  # a setting that changes the results
    (cfg.run_dir / "config.json").write_text(json.dumps(stored))
    assert not _finished_with(cfg)
