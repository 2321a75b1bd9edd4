import json
import re
import sys
import tarfile
from unittest import mock

import pytest

from fastclip.cli import parse_args
from fastclip.config import Config
from fastclip.engine import deepspeed_config
from fastclip.errors import ConfigError
from fastclip.preflight import check_inputs
from fastclip.schedules import total_steps

from runs import ROOT, run_cli, small_run_args


def test_defaults_are_the_demo():
    cfg = parse_args([])
    assert cfg.data.demo and cfg.model.name == "fastclip-tiny" and cfg.train.precision == "auto"


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


@pytest.mark.parametrize("body", ["optim:\n", "optim:\ntrain:\n  steps: 4\n", "optim: ~\n", "optim: {}\n"])
def test_empty_yaml_section_means_defaults(tmp_path, body):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(body)
    cfg = parse_args(["--config", str(yaml_file), "--optim.lr", "1e-4"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-6
    assert parse_args(["--config", str(yaml_file)]).optim.lr == 1e-3


@pytest.mark.parametrize("body", ["optim: 3\n", "optim: fast\n", "optim: [1, 2]\n"])
@pytest.mark.parametrize("extra", [[], ["--optim.lr", "1e-4"]])
def test_scalar_yaml_section_is_refused(tmp_path, body, extra):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(body)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(yaml_file), *extra])
    assert "optim" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", ".inf", "-.inf", ".nan", "Infinity", "1e999"])
@pytest.mark.parametrize(
    "name", ["optim.lr", "optim.eps", "optim.grad_clip", "optim.weight_decay", "eval.early_stop_min_delta"]
)
def test_non_finite_floats_are_refused(name, text):
    with pytest.raises(ConfigError, match="finite") as err:
        parse_args([f"--{name}", text])
    assert str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), ".inf", "-.inf", ".nan"])
def test_non_finite_floats_from_yaml_are_refused(tmp_path, value):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"optim:\n  lr: {value}\ndata:\n  crop_scale: [0.5, 1.0]\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number"):
        parse_args(["--config", str(yaml_file)])
    with pytest.raises(ConfigError, match=r"^data\.crop_scale\[1\]: must be a finite number"):
        parse_args(["--data.crop_scale", f"[0.5, {value}]"])


@pytest.mark.parametrize("eps", ["0", "-1", "-1e-8"])
def test_optim_eps_must_be_positive(eps):
    with pytest.raises(ConfigError, match=r"^optim\.eps: must be positive"):
        parse_args(["--optim.eps", eps])
    assert parse_args(["--optim.eps", "1e-8"]).optim.eps == 1e-8


@pytest.mark.parametrize(
    "argv, flag, instead",
    [
        (["--train.steps", "--log.every", "3"], "--train.steps", "--log.every"),
        (["--optim.lr", "--optim.eps=1e-8"], "--optim.lr", "--optim.eps=1e-8"),
        (["--config", "--train.steps", "3"], "--config", "--train.steps"),
        (["--deepspeed_config", "--help"], "--deepspeed_config", "--help"),
    ],
)
def test_flag_without_value_names_the_next_option(argv, flag, instead):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert str(err.value) == f"{flag} needs a value (got the option {instead} instead)"


def test_negative_numbers_are_values():
    cfg = parse_args(["--optim.weight_decay", "-0", "--train.steps", "3", "--optim.min_lr_ratio", "-0.0"])
    assert cfg.train.steps == 3 and cfg.optim.weight_decay == 0
    with pytest.raises(ConfigError, match=r"^optim\.eps: must be positive.*got -1"):
        parse_args(["--optim.eps", "-1"])
    with pytest.raises(ConfigError, match=r"^data\.batch_size: "):
        parse_args(["--data.batch_size", "-3"])


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
    cfg = parse_args(["--data.batch_size", "32", "--train.grad_accum", "2", "--train.zero_stage", "3",
                      "--train.precision", "bf16"])  # fmt: skip
    ds = deepspeed_config(cfg, world_size=4, cuda=False)
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert "scheduler" not in ds  # fastclip's own LambdaLR (fastclip/schedules.py), passed to deepspeed.initialize
    assert ds["timers"]["throughput"]["enabled"] is False and ds["bf16"]["check_grad_overflow"] is False


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_where_the_device_runs_it_natively(monkeypatch, native):
    from fastclip import precision
    from fastclip.banner import precision_part

    monkeypatch.setattr(precision, "native_bf16", lambda cuda: native)
    ds = deepspeed_config(parse_args([]), world_size=1, cuda=False)
    assert ds["bf16"]["enabled"] is native and "torch_autocast" not in ds
    runs = precision.resolve("auto", cuda=False)
    assert runs == ("bf16" if native else "fp32") and precision.resolve("amp_bf16", cuda=False) == "amp_bf16"
    said = precision_part("auto", runs, "CPU")
    assert said == "bf16" if native else "no native bf16 on this CPU; --train.precision bf16 forces it" in said
    ds = deepspeed_config(parse_args(["--train.precision", "bf16"]), world_size=1, cuda=False)
    assert ds["bf16"]["enabled"] is True  # asked for: whatever the device


def test_a_deepspeed_config_file_is_merged_over_the_derived_one(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 10**8}, "prescale_gradients": False}))
    ds = deepspeed_config(parse_args(["--deepspeed_config", str(path)]), world_size=2, cuda=False)
    assert ds["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False, "reduce_bucket_size": 10**8}
    assert ds["prescale_gradients"] is False
    assert ds["timers"]["throughput"]["enabled"] is False and ds["bf16"]["check_grad_overflow"] is False  # kept
    path.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}, "bfloat16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled=true where train.precision auto \(on this device\) gives"):
        with mock.patch("fastclip.precision.native_bf16", lambda cuda: False):
            deepspeed_config(parse_args(["--deepspeed_config", str(path)]), world_size=2, cuda=False)
    ds = deepspeed_config(parse_args(["--deepspeed_config", str(path), "--train.precision", "bf16"]), world_size=2,
                          cuda=False)  # fmt: skip
    assert ds["optimizer"] == {"type": "Lamb", "params": {"lr": 1e-3}}  # another optimizer: whole, not merged
    assert "bfloat16" not in ds and ds["bf16"]["enabled"] is True  # DeepSpeed's older name for the section
    path.write_text(json.dumps({"optimizer": {"params": {"torch_adam": True}}}))
    ds = deepspeed_config(parse_args(["--deepspeed_config", str(path)]), world_size=2, cuda=False)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-3  # AdamW: merged


@pytest.mark.parametrize(
    "given, args, said",
    [
        ({"train_micro_batch_size_per_gpu": 16}, ["--data.batch_size", "8"], "train_micro_batch_size_per_gpu=16 where"),
        ({"zero_optimization": {"stage": 1}}, [], "zero_optimization.stage=1 where train.zero_stage gives 2"),
        ({"bf16": {"enabled": False}}, ["--train.precision", "bf16"], "bf16.enabled=false where train.precision gives"),
        ({"fp16": {"enabled": True}}, ["--train.precision", "fp32"], "fp16.enabled=true: fastclip trains in bf16 or"),
        ({"bf16": {"check_grad_overflow": True}}, [], "bf16.check_grad_overflow=true where optim.skip_nonfinite"),
        ({"gradient_clipping": 0.5}, [], "gradient_clipping=0.5 where optim.grad_clip gives 1.0"),
        ({"optimizer": {"params": {"lr": 0.1}}}, [], "optimizer.params.lr=0.1 where optim.lr gives 0.001"),
        ({"zero_optimization": None}, [], "zero_optimization must be a JSON object, got None"),
        (
            {"gradient_accumulation_steps": 8},
            ["--train.grad_accum", "4"],
            "gradient_accumulation_steps=8 where the run config gives 4 (train.grad_accum)",
        ),
        (
            {"train_batch_size": 1024},
            ["--train.grad_accum", "4"],
            "train_batch_size=1024 where the run config gives "
            "512 (data.batch_size x train.grad_accum x 2 ranks); --train.grad_accum 8 would give train_batch_size=1024",
        ),
        (
            {"train_batch_size": 1000},
            [],
            "no train.grad_accum gives train_batch_size=1000 with data.batch_size 64: it is not a multiple of 64 x 2",
        ),
        ({"train_batch_size": "auto"}, [], "train_batch_size=auto where the run config gives 128"),
    ],
)
def test_a_deepspeed_config_that_contradicts_the_run_config_names_both(tmp_path, given, args, said):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(given))
    with pytest.raises(ConfigError, match=re.escape(said)):
        deepspeed_config(parse_args(["--deepspeed_config", str(path), *args]), world_size=2, cuda=False)
    if "stage" in json.dumps(given):  # the same file with the run config saying the same: accepted
        ds = deepspeed_config(
            parse_args(["--deepspeed_config", str(path), "--train.zero_stage", "1"]), world_size=2, cuda=False
        )
        assert ds["zero_optimization"]["stage"] == 1


def test_too_few_samples_for_one_batch():
    with pytest.raises(ConfigError, match=r"^data\.batch_size=64: an epoch holds 100 samples \(data\.train_shards\), "
                       r"fewer than one optimizer step's 128 .*; lower it to 50 at most"):  # fmt: skip
        total_steps(100, batch_size=64, grad_accum=1, world_size=2, steps=0, epochs=3)
    # too many micro batches: the bound is the micro batches an epoch holds
    with pytest.raises(ConfigError, match=r"^train\.grad_accum=1000000: .*; set it to 32 at most"):
        total_steps(512, batch_size=16, grad_accum=1_000_000, world_size=1, steps=5, epochs=3)
    with pytest.raises(ConfigError, match=r"make their product 5 at most"):
        total_steps(10, batch_size=8, grad_accum=8, world_size=2, steps=0, epochs=3)
    assert total_steps(1280, batch_size=64, grad_accum=1, world_size=2, steps=0, epochs=2) == (20, 10)
    assert total_steps(1280, batch_size=64, grad_accum=1, world_size=2, steps=7, epochs=2) == (7, 10)


def test_grad_accum_past_an_epoch_is_refused_before_any_model(world_dir, tmp_path):
    """--train.grad_accum 1000000 was refused only once the model was built; the start-up check knows the shards'
    count (512 samples, 16 a micro batch) and says the bound."""
    args = small_run_args(world_dir, tmp_path, steps=5) + ["--data.loader", "torch", "--train.grad_accum", "1000000"]
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "params" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith("fastclip: train.grad_accum=1000000: an epoch holds 512 samples (data.train_shards, ")
    assert "set it to 32 at most" in said


def test_shipped_configs_parse():
    from pathlib import Path

    paths = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert [p.name for p in paths] == ["demo.yaml", "vit-b-16.yaml", "vit-b-32.yaml", "vit-h-14.yaml", "vit-l-14.yaml"]
    for path in paths:
        parse_args(["--config", str(path)])


def test_help_lists_every_field_with_its_doc():
    import dataclasses
    import subprocess
    import sys

    from fastclip.cli import _field_docs, usage

    text = usage()
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "deepspeed_config":
            continue
        docs = _field_docs(type(getattr(defaults, section.name)))
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert f"--{section.name}.{f.name} " in text
            # a doc comment on the field's own line (a formatter that wraps a long one hides it from --help)
            assert docs.get(f.name), f"{section.name}.{f.name} has no one-line doc comment"
    assert "peak learning rate" in text and "ZeRO stage" in text
    proc = subprocess.run([sys.executable, "-m", "fastclip.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--data.train_shards" in proc.stdout


def test_a_second_config_file_and_yaml_looking_values_are_not_misread(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("data:\n  batch_size: 8\n")
    two.write_text("data:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"--config given twice .*one\.yaml.*two\.yaml"):
        parse_args(["--config", str(one), "--config", str(two)])
    # a trailing '::' reads as a YAML mapping; the shard spec stays the string the user typed
    assert parse_args(["--data.train_shards", "a/*.tar::"]).data.train_shards == "a/*.tar::"
    assert parse_args(["--optim.betas", "[0.9, 0.95]"]).optim.betas == (0.9, 0.95)
