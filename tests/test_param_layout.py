"""Where the optimizer puts the parameters (issue 28): every parameter 16-byte aligned after the engine is built,
at every ZeRO stage and precision, for every architecture fastclip ships a config for; open_clip_train's
weight-decay groups; checkpoints of the earlier layout still resume.

Why it matters: DeepSpeed's ZeRO-1/2 make each parameter a view into its group's flat buffer, padded only at the
group's end. With the 1-element logit scale early in a group, every later tensor started 2 bytes (bf16) off a
16-byte boundary: 201 of ViT-B/32's 302, every bias and LayerNorm weight, which cuBLASLt's bias epilogues and the
vectorized LayerNorm kernels want aligned. Real engines are built for the tiny model and ViT-B/32; the large
towers' layouts are computed the way DeepSpeed lays them out (:func:`computed_misaligned`), a model checked against
the real engines first.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.model import param_group_names
from fastclip.world import free_port

from runs import ROOT, run_cli, small_run_args, torchrun_cmd

STAGES, PRECISIONS = (0, 1, 2, 3), ("bf16", "amp_bf16", "fp32")
OLD = {"rule": "no_embeddings", "align": False}  # the layout before issue 28 (today's code then)
SHIPPED = ("fastclip-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")  # configs/*.yaml's models


def _engine(name: str, stage: int, precision: str, *, layout: dict | None = None, siglip: bool = False):
    """The trainer's engine for ``name`` (fp32 model built on the CPU, then DeepSpeed's initialize)."""
    from torch.optim.lr_scheduler import LambdaLR

    from fastclip.cli import parse_args
    from fastclip.engine import build_engine
    from fastclip.model import build_model, param_groups

    cfg = parse_args(["--model.name", name, "--train.zero_stage", str(stage), "--train.precision", precision])
    clip = build_model(cfg.model, siglip=siglip)
    params = param_groups(clip, weight_decay=0.1, **(layout or {}))
    engine, _, _ = build_engine(clip, cfg=cfg, world_size=1, cuda=False, params=params,
                                lr_scheduler=lambda opt: LambdaLR(opt, lambda step: 1.0))  # fmt: skip
    return engine


def misaligned(engine) -> set[str]:
    return {name for name, p in engine.module.named_parameters() if p.data_ptr() % 16}


def computed_misaligned(clip: torch.nn.Module, stage: int, precision: str, *, layout: dict | None = None) -> set[str]:
    """The parameters DeepSpeed 0.19 leaves off a 16-byte boundary, from the groups' sizes alone: ZeRO-1/2 flatten
    each group into one buffer (an aligned allocation) with the tensors back to back; ZeRO-0 and ZeRO-3 keep
    each tensor in an allocation of its own."""
    if stage not in (1, 2):
        return set()
    element = 2 if precision == "bf16" else 4  # amp_bf16 keeps fp32 weights
    sizes = {name: p.numel() for name, p in clip.named_parameters()}
    bad = set()
    for _, names in param_group_names(clip, **(layout or {})):
        offsets = [0, *itertools.accumulate(sizes[n] for n in names)]
        bad |= {n for n, offset in zip(names, offsets) if offset * element % 16}
    return bad


def _meta_model(name: str, siglip: bool = False) -> torch.nn.Module:
    """An architecture's parameters as the trainer holds them (scalars as [1]), on the meta device: no memory."""
    import open_clip

    from fastclip.model import SCALAR_PARAMS, SIGLIP_INIT, resolve_model_name

    with torch.device("meta"):
        clip = open_clip.create_model(resolve_model_name(name), device="meta", **(SIGLIP_INIT if siglip else {}))
    for attr in SCALAR_PARAMS:
        if isinstance(getattr(clip, attr, None), torch.nn.Parameter):
            setattr(clip, attr, torch.nn.Parameter(getattr(clip, attr).detach().reshape(1)))
    return clip


def expected_misaligned(stage: int, siglip: bool) -> set[str]:
    """Nothing, but SigLIP's scalar logit bias under ZeRO-1/2: the second 1-element tensor at the end of the no-decay
    group, after the logit scale (fastclip/model.py's param_group_names says why not a group of its own)."""
    return {"logit_bias"} if siglip and stage in (1, 2) else set()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_parameter_aligned_in_real_engines(single_rank, stage, precision):
    """The tiny model (and with SigLIP's 1-element bias as well) in every stage and precision: nothing off the
    boundary but that scalar, and the computed layout says exactly what the engine did, for the aligned layout and
    the old one."""
    linear = torch.nn.functional.linear
    for siglip in (False, True):
        engine = _engine("fastclip-tiny", stage, precision, siglip=siglip)
        assert torch.nn.functional.linear is linear  # ZeRO-3's process-wide replacement is off (fastclip/engine.py)
        assert misaligned(engine) == expected_misaligned(stage, siglip), (siglip, sorted(misaligned(engine))[:5])
        assert misaligned(engine) == computed_misaligned(_meta_model("fastclip-tiny", siglip), stage, precision)
        del engine
    clip = _meta_model("fastclip-tiny")
    old = _engine("fastclip-tiny", stage, precision, layout=OLD)
    assert misaligned(old) == computed_misaligned(clip, stage, precision, layout=OLD)
    assert bool(misaligned(old)) == (stage in (1, 2))  # the census fails on the layout before this change


@pytest.mark.parametrize("stage", (1, 2))
def test_vit_b_32_aligned_where_201_of_302_were_not(single_rank, stage):
    engine = _engine("ViT-B-32", stage, "bf16")
    assert misaligned(engine) == set() and len(list(engine.module.parameters())) == 302
    del engine
    old = _engine("ViT-B-32", stage, "bf16", layout=OLD)
    bad = misaligned(old)
    assert len(bad) == 201 and "visual.transformer.resblocks.0.ln_1.weight" in bad
    assert bad == computed_misaligned(_meta_model("ViT-B-32"), stage, "bf16", layout=OLD)


@pytest.mark.parametrize("name", [*SHIPPED, "ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP"])
def test_every_shipped_architecture_aligned_by_its_computed_layout(name):
    siglip = "SigLIP" in name
    clip = _meta_model(name, siglip=siglip)
    for stage in STAGES:
        for precision in PRECISIONS:
            assert computed_misaligned(clip, stage, precision) == expected_misaligned(stage, siglip), (stage, precision)
    assert len(computed_misaligned(clip, 2, "bf16", layout=OLD)) > 2  # the old layout was not: the check can fail
    (decay, _), (no_decay, names) = param_group_names(clip)
    assert (decay, no_decay) == ("decay", "no_decay")
    assert names[-2:] == ["logit_scale", "logit_bias"] if siglip else names[-1] == "logit_scale"


def _open_clip_train_exclude():
    """open_clip_train's own no-decay predicate, read from its main() (it is a local lambda there), so a change of
    its rule shows here."""
    import inspect

    import open_clip_train.main

    line = next(ln for ln in inspect.getsource(open_clip_train.main).splitlines() if "exclude = lambda" in ln)
    return eval(line.split("=", 1)[1].strip())


def test_decay_groups_are_open_clip_trains():
    """open_clip_train's own rule (its main(): exclude = ndim < 2 or bn/ln/bias/logit_scale in the name), applied
    to open_clip's own model (0-dim logit scale), names the same parameters as fastclip's default 'open_clip'
    groups; 'no_embeddings' differs by the 2-d embeddings exactly."""
    import open_clip

    from fastclip.model import build_model, resolve_model_name

    for name, siglip in (("fastclip-tiny", False), ("fastclip-tiny", True), ("ViT-B-32", False)):
        theirs = open_clip.create_model(resolve_model_name(name), **({"init_logit_bias": -10.0} if siglip else {}))
        exclude = _open_clip_train_exclude()
        decayed = {n for n, p in theirs.named_parameters() if not exclude(n, p) and p.requires_grad}
        ours = build_model(ModelConfig(name=name), siglip=siglip)
        groups = param_group_names(ours)
        assert {n for kind, names in groups if kind == "decay" for n in names} == decayed
        assert {n for _, names in groups for n in names} == {n for n, _ in theirs.named_parameters()}
        old = {n for kind, names in param_group_names(ours, rule="no_embeddings") if kind == "decay" for n in names}
        assert decayed - old == {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"}


def test_weight_decay_reaches_the_groups(single_rank, world_dir, tmp_path):
    """Every 'decay' group gets optim.weight_decay and the others none, through DeepSpeed's optimizer."""
    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    trainer = Trainer(parse_args(small_run_args(world_dir, tmp_path, steps=2) + ["--optim.weight_decay", "0.3"]),
                      single_rank)  # fmt: skip
    try:
        groups = trainer.engine.optimizer.param_groups
        assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.3), ("no_decay", 0.0)]
        meta = trainer.checkpoints.meta["param_groups"]
        assert len(meta) == len(groups) and meta[1][1][-1] == "logit_scale"  # ZeRO's groups: one flat tensor each
    finally:
        trainer.close()


def _losses(path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "early_stop" not in r}


@pytest.mark.parametrize("stage", (2, 0))
def test_checkpoint_of_the_old_layout_resumes(single_rank, world_dir, tmp_path, capsys, stage):
    """A checkpoint written with the layout before this change (the old groups, and no record of them in its
    fastclip.json, as the code of that time wrote it): at ZeRO-1/2 it resumes into the aligned layout, regrouped
    by parameter name, with the same losses as the run that wrote it going on in its own layout; at ZeRO-0 it is
    refused in one line naming the flags that resume it."""
    from fastclip.cli import parse_args
    from fastclip.errors import ConfigError
    from fastclip.trainer import Trainer

    old = ["--train.align_params", "false", "--optim.decay_rule", "no_embeddings"]
    # fp32 and whole-image crops: a resumed run's losses equal the uninterrupted run's (random crops are drawn anew)
    common = ["--train.precision", "fp32", "--train.zero_stage", str(stage), "--checkpoint.every", "2",
              "--data.loader", "torch", "--data.num_threads", "1", "--data.crop_scale", "[1.0, 1.0]"]  # fmt: skip
    first = tmp_path / "first"
    trainer = Trainer(parse_args(small_run_args(world_dir, first, steps=4) + common + old), single_rank)
    try:
        trainer.train()
    finally:
        trainer.close()
    meta_path = first / "checkpoints" / "step_00000002" / "fastclip.json"
    meta = json.loads(meta_path.read_text())
    del meta["param_groups"]  # as written before the record existed
    meta_path.write_text(json.dumps(meta))
    again = tmp_path / "again"
    args = small_run_args(world_dir, again, steps=4) + common + ["--optim.decay_rule", "no_embeddings"]
    args += ["--checkpoint.dir", str(first / "checkpoints"), "--checkpoint.resume", str(meta_path.parent)]
    if stage == 0:
        with pytest.raises(
            ConfigError, match="Resume with --optim.decay_rule no_embeddings --train.align_params false"
        ):
            Trainer(parse_args(args), single_rank)
        return
    trainer = Trainer(parse_args(args), single_rank)
    try:
        assert len(trainer.engine.optimizer.param_groups) == 2
        trainer.train()
    finally:
        trainer.close()
    assert "regrouped by parameter name" in capsys.readouterr().out
    before, after = _losses(first / "metrics.jsonl"), _losses(again / "metrics.jsonl")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-5), (step, before, after)
    _resumes_on_two_ranks(meta_path.parent, world_dir, tmp_path, common)


def _resumes_on_two_ranks(folder, world_dir, tmp_path, common: list[str]) -> None:
    """The same old-layout checkpoint resumed on 2 ranks (a world-size change too, through the universal format):
    every rank's partition of each aligned group holds parameters (a 1-element group's would be padding alone on
    rank 1, where DeepSpeed's universal load fails), the weights are the checkpoint's, and a step trains."""
    from fastclip.export import fp32_weights

    out = tmp_path / "two"
    args = small_run_args(world_dir, out, steps=3) + common + ["--optim.decay_rule", "no_embeddings"]
    args += ["--checkpoint.dir", str(folder.parent), "--checkpoint.resume", str(folder), "--data.val_shards", "null"]
    cmd = torchrun_cmd(2, free_port(), ROOT / "tests" / "resume_worker.py")
    proc = run_cli([*cmd, "--out", str(tmp_path / "two.pt"), *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "regrouped by parameter name" in proc.stdout and "was saved on 1 rank" in proc.stdout
    loaded = torch.load(tmp_path / "two.pt")
    for name, value in fp32_weights(folder).items():
        torch.testing.assert_close(loaded["state"][name], value, rtol=0, atol=0, msg=name)
    assert _losses(out / "metrics.jsonl").keys() == {3}


def _open_clip_step(model, batch, *, amp: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """open_clip_train's step on ``batch``: its forward (under autocast to bf16 for amp) and ClipLoss; the loss and
    the gradients."""
    import open_clip

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(batch.images.float(), batch.texts)
        scale = out["logit_scale"].reshape(())  # exp(logit_scale), as open_clip's forward returns it
        loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], scale)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_amp_bf16_matches_open_clips_amp_step(single_rank, world_dir, tmp_path):
    """train.precision amp_bf16 at ZeRO-2: fp32 weights, DeepSpeed's torch autocast; the loss and every gradient
    of the first step match open_clip's AMP step (autocast to bf16, ClipLoss) on the same batch and weights.

    The bf16 error rule: against the exact (fp32) step, fastclip's loss and each gradient are no further than
    twice open_clip's AMP step is, plus 2^-8 of its size (one bf16 ulp): fastclip's amp_bf16 is as exact as
    open_clip's, whatever bf16 rounding costs both (their losses round the logits differently: ClipLoss's matmul
    autocasts to bf16, the fused loss keeps them in fp32)."""
    from deepspeed.utils import safe_get_full_grad

    from fastclip.cli import parse_args
    from fastclip.model import build_model
    from fastclip.trainer import Trainer

    extra = ["--train.precision", "amp_bf16", "--train.zero_stage", "2", "--data.loader", "torch"]
    trainer = Trainer(parse_args(small_run_args(world_dir, tmp_path, steps=2) + extra), single_rank)
    try:
        assert trainer.precision == "amp_bf16" and trainer.engine.torch_autocast_enabled()
        assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
        batch = next(iter(trainer.train_loader))
        theirs = build_model(trainer.cfg.model)
        theirs.load_state_dict({k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()})
        loss, _ = trainer.forward_and_loss(batch)
        trainer.backward(loss)
        ours = {n: safe_get_full_grad(p).clone() for n, p in trainer.engine.module.named_parameters()}
    finally:
        trainer.close()
    amp_loss, amp = _open_clip_step(theirs, batch, amp=True)
    exact_loss, exact = _open_clip_step(theirs, batch, amp=False)
    assert abs(loss.item() - exact_loss) <= 2 * abs(amp_loss - exact_loss) + 2**-8 * abs(exact_loss)
    worst = {}
    for name, g in exact.items():
        ours_off, theirs_off = (ours[name] - g).norm(), (amp[name] - g).norm()
        assert ours_off <= 2 * theirs_off + 2**-8 * g.norm(), (name, float(ours_off), float(theirs_off))
        worst[name] = float(ours_off / theirs_off.clamp(min=1e-12))
    assert max(worst.values()) < 2 and len(worst) == len(ours)
    # and it did run in bf16: an fp32 step would pass the rule above without being open_clip's amp step
    total = {
        k: sum(float((g[n] - exact[n]).norm() ** 2) for n in exact) ** 0.5 for k, g in (("ours", ours), ("amp", amp))
    }
    assert total["ours"] > 0.25 * total["amp"], total
