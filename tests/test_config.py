import json
import tarfile

import pytest

from fastclip.config import Config, ConfigError, check_inputs, deepspeed_config, parse_args, total_steps


def test_defaults_are_the_demo():
    cfg = parse_args([])
    assert cfg.data.demo and cfg.model.name == "fastclip-tiny" and cfg.train.precision == "bf16"


def test_overrides_and_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data:\n  batch_size: 8\ntrain:\n  zero_stage: 1\n  steps: 5\n")
    cfg = parse_args(
        [
            "--local_rank=1",
            "--config",
            str(yaml_file),
            "--train.steps",
            "7",
            "--optim.betas=[0.9, 0.95]",
            "--log.every=3",
            "--optim.lr",
            "2e-3",
        ]
    )
    assert cfg.data.batch_size == 8 and cfg.train.zero_stage == 1 and cfg.train.steps == 7
    assert cfg.optim.betas == (0.9, 0.95) and cfg.log.every == 3 and cfg.optim.lr == 2e-3
    assert parse_args(["--checkpoint.resume", "latest"]).checkpoint.resume == "latest"
    assert parse_args(["--model.pretrained", "null"]).model.pretrained is None


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--data.batch_sise", "4"], ["data.batch_sise", "data.batch_size"]),
        (["--dataa.batch_size", "4"], ["dataa", "data"]),
        (["--data.batch_size", "0"], ["data.batch_size", "positive"]),
        (["--data.batch_size", "-3"], ["data.batch_size"]),
        (["--data.batch_size", "four"], ["data.batch_size", "integer"]),
        (["--train.zero_stage", "4"], ["train.zero_stage"]),
        (["--train.precision", "fp8"], ["train.precision"]),
        (["--log.every", "0"], ["log.every"]),
        (["--optim.betas", "0.9"], ["optim.betas"]),
        (["stray"], ["stray"]),
    ],
)
def test_bad_config_names_the_field(argv, names):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    for name in names:
        assert name in str(err.value)


def test_missing_and_unreadable_shards_name_the_field_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train_shards: .*matches no file"):
        check_inputs(parse_args(["--data.train_shards", str(tmp_path / "nothing-*.tar")]))
    with pytest.raises(ConfigError, match=r"data\.val_shards: shard .*missing\.tar.* does not exist"):
        check_inputs(parse_args(["--data.val_shards", str(tmp_path / "missing.tar")]))
    bad = tmp_path / "bad-000.tar"
    bad.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ConfigError, match=r"data\.train_shards: shard .*bad-000\.tar.* not a readable tar"):
        check_inputs(parse_args(["--data.train_shards", str(tmp_path / "bad-{000..000}.tar")]))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ConfigError, match="empty tar"):
        check_inputs(parse_args(["--data.train_shards", str(empty)]))


def test_zeroshot_files_are_checked(tmp_path):
    bad = tmp_path / "names.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="data.zeroshot_classnames"):
        check_inputs(parse_args(["--data.zeroshot_classnames", str(bad)]))


def test_derived_deepspeed_config():
    cfg = parse_args(["--data.batch_size", "32", "--train.grad_accum", "2", "--train.zero_stage", "3"])
    ds = deepspeed_config(cfg, world_size=4, cuda=False)
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert "scheduler" not in ds  # fastclip's own LambdaLR (fastclip/schedules.py), passed to deepspeed.initialize
    assert ds["timers"]["throughput"]["enabled"] is False and ds["bf16"]["check_grad_overflow"] is False


def test_user_deepspeed_config_must_agree_on_batch(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 1}}))
    cfg = parse_args(["--deepspeed_config", str(path), "--data.batch_size", "16"])
    ds = deepspeed_config(cfg, world_size=2, cuda=False)
    assert ds["zero_optimization"] == {"stage": 1} and ds["train_batch_size"] == 32
    cfg = parse_args(["--deepspeed_config", str(path), "--data.batch_size", "8"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 disagrees.*data.batch_size=8"):
        deepspeed_config(cfg, world_size=2, cuda=False)


def test_too_few_samples_for_one_batch():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        total_steps(Config(), samples_per_epoch=100, world_size=2)
    assert total_steps(parse_args(["--train.epochs", "2"]), samples_per_epoch=1280, world_size=2) == (20, 10)


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        parse_args(["--config", str(path)])


def test_help_lists_every_field_with_its_doc():
    import dataclasses
    import subprocess
    import sys

    from fastclip.config import Config, usage

    text = usage()
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "deepspeed_config":
            continue
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert f"--{section.name}.{f.name} " in text
    assert "peak learning rate" in text and "ZeRO stage" in text
    proc = subprocess.run([sys.executable, "-m", "fastclip.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--data.train_shards" in proc.stdout
