"""Settings from YAML and flags: flags win, and every problem is one line naming its source, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from bayprano import config
from bayprano.config import EvalConfig, TrainConfig, load_yaml_config
from bayprano.platform.model import backbone
from bayprano.platform.errors import ConfigError

REQUIRED = dict(data_root="data", shots="2", inner_steps="1", episodes="3", out="ckpt.pt")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_values_are_validated_and_flags_override_them(tmp_path):
    f = write(
        tmp_path / "train.yaml",
        "data-root: data\nshots: 3\ninner_steps: 2\nepisodes: 10\nout: a.pt\ncategories: [a, b]\nsecond_order: true\n",
    )
    cfg = load_yaml_config(f, TrainConfig, {"shots": "5", "episodes": None, "exclude": "c,d"})
    assert cfg.shots == 5 and cfg.episodes == 10 and cfg.inner_steps == 2 and cfg.second_order is True
    assert cfg.categories == ["a", "b"] and cfg.exclude == ["c", "d"] and cfg.data_root == Path("data")
    assert cfg.image_size == 252 and cfg.backbone == "dinov2_vits14" and cfg.lr == 2e-3
    lite = load_yaml_config(f, TrainConfig, {"backbone": "efficientnet_lite2", "image_size": None})
    assert (lite.backbone, lite.image_size) == ("efficientnet_lite2", 256)  # a backbone brings its own side
    sized = load_yaml_config(f, TrainConfig, {"backbone": "efficientnet_lite2", "image_size": "320"})
    assert sized.image_size == 320
    with pytest.raises(ConfigError, match=r"image_size 256 is not a multiple of 14.*use 252"):
        load_yaml_config(f, TrainConfig, {"image_size": "256"})
    ev = load_yaml_config(
        None, EvalConfig, {"data_root": "d", "output": "o.json", "shots": "5,1,5", "methods": "bayes,padim"}
    )
    assert ev.shots == [1, 5] and ev.methods == ["bayes", "padim"] and ev.checkpoint is None and ev.seeds == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("inner_steps: 11\n", "{f}: inner_steps = 11: must be less than or equal to 10"),
        ("shots: 0\n", "{f}: shots = 0: must be greater than or equal to 1"),
        ("colour: red\n", "{f}: unknown key 'colour' (value 'red')"),
        ("backbone: vgg_nonexistent\n", "{f}: backbone = 'vgg_nonexistent': unknown backbone"),
        ("second_order: maybe\n", "{f}: second_order = 'maybe': must be a valid boolean"),
        ("- a\n- b\n", "{f}: a config file must be a mapping of keys to values, got list"),
        ("shots: [1\n", "{f}: not valid YAML (line 2, column 1: expected ',' or ']'"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_key_and_value(tmp_path, text, message):
    f = write(tmp_path / "bad.yaml", text)
    overrides = {k: v for k, v in REQUIRED.items() if k not in text}
    with pytest.raises(ConfigError) as info:
        load_yaml_config(f, TrainConfig, overrides)
    assert str(info.value).startswith(message.format(f=f)) and "\n" not in str(info.value)


def test_a_bad_flag_names_the_flag_and_missing_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^--inner-steps 11: must be less than or equal to 10$"):
        load_yaml_config(None, TrainConfig, {**REQUIRED, "inner_steps": "11"})
    with pytest.raises(ConfigError, match=r"^--target-fpr 1.5: must be less than 1$"):
        load_yaml_config(None, EvalConfig, {"data_root": "d", "output": "o", "target_fpr": "1.5"})
    with pytest.raises(ConfigError, match=r"^--methods bayes,knn: unknown method 'knn' \(valid: bayes, "):
        load_yaml_config(None, EvalConfig, {"data_root": "d", "output": "o", "methods": "bayes,knn"})
    with pytest.raises(ConfigError, match=r"^episodes is required \(--episodes or 'episodes:' in a --config file\)$"):
        load_yaml_config(None, TrainConfig, {k: v for k, v in REQUIRED.items() if k != "episodes"})
    with pytest.raises(ConfigError, match="category 'a' is both selected and excluded"):
        load_yaml_config(None, TrainConfig, {**REQUIRED, "categories": "a,b", "exclude": "a"})
    with pytest.raises(ConfigError, match="give either checkpoint or meta_train_root, not both"):
        load_yaml_config(None, EvalConfig, {"data_root": "d", "output": "o", "checkpoint": "c", "meta_train_root": "r"})
    with pytest.raises(ConfigError, match=r"nope.yaml: config file does not exist"):
        load_yaml_config(tmp_path / "nope.yaml", TrainConfig, REQUIRED)
    assert config.MIN_IMAGE_SIZE == backbone.MIN_IMAGE_SIZE
    with pytest.raises(ConfigError, match=r"^--image-size 16: must be greater than or equal to 32$"):
        load_yaml_config(None, TrainConfig, {**REQUIRED, "image_size": "16"})


def test_sites_flag_names_each_site_with_its_shard_path_like_the_yaml_form(tmp_path, capsys):
    from bayprano.cli import build_parser, main
    from bayprano.commands.common import settings_from_args
    from bayprano.config import FederatedTrainConfig

    args = build_parser().parse_args(
        [
            "train",
            "--sites",
            "plant-a=/data/a.parquet, plant-b=/data/b.parquet",
            "--out",
            str(tmp_path / "fed.pt"),
            "--sites-per-round",
            "1",
            "--rounds",
            "2",
        ]
    )
    cfg = settings_from_args(args, FederatedTrainConfig)
    f = write(
        tmp_path / "fed.yaml",
        f"sites:\n  plant-a: /data/a.parquet\n  plant-b: /data/b.parquet\n"
        f"out: {tmp_path / 'fed.pt'}\nsites_per_round: 1\nrounds: 2\n",
    )
    assert (
        cfg.site_paths()
        == load_yaml_config(f, FederatedTrainConfig, {}).site_paths()
        == {"plant-a": "/data/a.parquet", "plant-b": "/data/b.parquet"}
    )
    for bad, words in (("plant-a", "is not NAME=PATH"), ("a=/x,a=/y", "given twice")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--sites", bad, "--out", str(tmp_path / "x.pt")])
        assert exit_.value.code == 2 and words in capsys.readouterr().err
