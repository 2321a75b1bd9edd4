"""Contrastive accumulation (fastclip/accumulation.py): K micro batches give the gradients of one step on the whole
batch, with every negative; the replay draws the random masks of the first forward; running out of memory says
which batch did not fit and what to lower."""

import json
import math

import pytest
import torch

from fastclip.cli import parse_args
from fastclip.world import free_port

from runs import ROOT, run_cli, small_run_args, torchrun_cmd


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _close(ours: dict, reference: dict, *, rtol: float) -> list[str]:
    """The parameter changes of ``ours`` that differ from ``reference``'s by more than ``rtol`` of that tensor's
    largest change. fp32 summation order alone moves a few (layer-norm gains, whose gradients are sums that
    cancel) by up to 3e-4; plain accumulation moves most tensors by more than 5e-2."""
    bad = []
    for name, ref in reference["delta"].items():
        err = (ours["delta"][name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        if err > rtol:
            bad.append(f"{name}: {err:.2e}")
    return bad


CASES = {
    # stage/local_loss/gather_with_grad[/precision[/backend[/kind]]]; with one rank there is nothing to gather. ZeRO-0
    # in bf16 is DeepSpeed's BF16_Optimizer; loss.backend torch replays every micro batch (it keeps no graph); SigLIP
    # caches the logit bias's gradient beside the scale's
    # (ZeRO-1 and ZeRO-3 on one rank: the 2- and 4-rank runs have them, where they partition something)
    1: "0/true/true,2/true/true,2/true/true/fp32/torch,0/true/true/bf16,2/true/true/bf16,2/true/true/amp_bf16,"
    "2/true/true/fp32/auto/siglip",
    2: "0/true/true,1/true/true,2/true/true,3/true/true,2/false/true,2/true/false,"
    "2/false/false,3/false/true/fp32/torch,2/true/true/bf16,2/true/true/fp32/auto/siglip",
    4: "0/true/true,1/true/true,2/true/true,3/true/true,2/true/true/bf16",  # K=1 only: the world-size comparison
}
_results: dict[int, dict] = {}


def _run(world_dir, tmp_path_factory, ranks: int) -> dict:
    """The worker's results on ``ranks`` ranks (launched once per test session)."""
    if ranks not in _results:
        tmp = tmp_path_factory.mktemp(f"accum{ranks}")
        cmd = torchrun_cmd(ranks, free_port(), ROOT / "tests" / "accum_worker.py")  # a fixed port collides
        args = ["--out", str(tmp / "result.pt"), "--world", str(world_dir), "--log-folder", str(tmp / "log"),
                "--cases", CASES[ranks]] + (["--ways", "one"] if ranks == 4 else [])  # fmt: skip
        _check(run_cli(cmd + args, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "tests")}))
        _results[ranks] = torch.load(tmp / "result.pt")
    return _results[ranks]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_k_micro_batches_step_as_one_batch_of_k_times_the_samples(world_dir, tmp_path_factory, ranks):
    results = _run(world_dir, tmp_path_factory, ranks)
    assert list(results) == CASES[ranks].split(",")
    for case, ways in results.items():
        one, ours = ways["one"], ways["contrastive"]
        bf16 = "bf16" in case  # the towers run in bf16 at another batch shape: rounding differs, not the method
        assert ours["loss"] == pytest.approx(one["loss"], rel=1e-3 if bf16 else 1e-5), case
        if case.startswith("0/") and "bf16" not in case:  # fp32 ZeRO-0 reports no norm: the unclipped changes do
            assert math.isnan(ours["grad_norm"]) and math.isnan(one["grad_norm"]), case
        else:
            assert ours["grad_norm"] == pytest.approx(one["grad_norm"], rel=5e-3 if bf16 else 1e-4), case
        assert ours["samples_seen"] == one["samples_seen"] == 48
        if not bf16:  # bf16 module weights move in steps of their last bit: only the fp32 norm is compared there
            assert not _close(ours, one, rtol=1e-3), f"{case}: {_close(ours, one, rtol=1e-3)}"
    # the comparison tells plain accumulation apart: its loss has a quarter of the negatives
    first = results[CASES[ranks].split(",")[0]]
    assert first["independent"]["loss"] < first["one"]["loss"] - 0.5
    assert len(_close(first["independent"], first["one"], rtol=0.05)) > 10


@pytest.mark.slow
def test_every_zero_stage_on_1_2_and_4_ranks_takes_the_same_step(world_dir, tmp_path_factory):
    """One global batch of 48: ZeRO 0-3 on 1, 2 and 4 ranks give one loss and one update (fp32: every parameter's
    change within 1e-3 of its largest; bf16: loss and grad norm within its rounding)."""
    reference = _run(world_dir, tmp_path_factory, 1)["0/true/true"]["one"]
    norm = _run(world_dir, tmp_path_factory, 1)["2/true/true"]["one"]["grad_norm"]  # fp32 ZeRO-0 reports none
    compared = 0
    for ranks in (1, 2, 4):
        for case, ways in _run(world_dir, tmp_path_factory, ranks).items():
            if not case.startswith(("0/true/true", "1/true/true", "2/true/true", "3/true/true")) or "torch" in case:
                continue
            if "siglip" in case:  # its own loss: 2 ranks against 1 below
                continue
            one, bf16 = ways["one"], "bf16" in case
            where = f"{ranks} ranks, ZeRO-{case}"
            assert one["loss"] == pytest.approx(reference["loss"], rel=2e-3 if bf16 else 1e-5), where
            if not bf16:
                assert not _close(one, reference, rtol=1e-3), f"{where}: {_close(one, reference, rtol=1e-3)}"
            if not math.isnan(one["grad_norm"]):
                # bf16 towers move the pre-clip norm by up to 1.5% from fp32's (ZeRO-0 bf16 on one rank, seen)
                assert one["grad_norm"] == pytest.approx(norm, rel=3e-2 if bf16 else 1e-4), where
            compared += 1
    # 1 rank: ZeRO 0/2 fp32 and bf16, ZeRO-2 amp_bf16; 2 and 4 ranks: ZeRO 0-3 fp32, ZeRO-2 bf16
    assert compared == 5 + 5 + 5
    # SigLIP (each rank's images against every rank's texts, bias trained): 2 ranks take the 1-rank step
    siglip = "2/true/true/fp32/auto/siglip"
    one, two = (_run(world_dir, tmp_path_factory, r)[siglip]["one"] for r in (1, 2))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and not _close(two, one, rtol=1e-3)
    assert one["delta"]["logit_bias"].abs().max() > 0


def _patch_dropout_model(tmp_path) -> str:
    from fastclip.model import _BUILTIN_CONFIGS

    spec = json.loads((_BUILTIN_CONFIGS / "fastclip-tiny.json").read_text())
    spec["vision_cfg"]["patch_dropout"] = 0.5
    path = tmp_path / "tiny-patch-dropout.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _trainer(single_rank, world_dir, tmp_path, extra):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path, steps=4) + ["--log.every", "1000", "--data.val_shards", "null"]
    return Trainer(parse_args(args + extra), single_rank)


def test_replay_draws_the_random_masks_of_the_first_forward(single_rank, world_dir, tmp_path):
    extra = ["--model.name", _patch_dropout_model(tmp_path), "--train.grad_accum", "3", "--data.batch_size", "8"]
    trainer = _trainer(single_rank, world_dir, tmp_path, extra)
    outputs = []
    forward = trainer.accumulation.forward

    def recorded(batch):
        out = forward(batch)
        outputs.append(out["image_features"].detach().clone())
        return out

    trainer.accumulation.forward = recorded
    try:
        batches = iter(trainer.train_loader)
        trainer.train_step(batches)
        first, replay = outputs[:3], outputs[3:]
        assert len(replay) == 2  # the last micro batch kept its graph from the first pass: no replay for it
        for k in range(2):
            torch.testing.assert_close(replay[k], first[k], rtol=0, atol=0)
        # patch dropout is live: the same batch forwarded twice from where the generators stand differs
        batch = trainer.fetch(batches)
        with torch.no_grad():
            once, twice = forward(batch)["image_features"], forward(batch)["image_features"]
        assert (once - twice).abs().max() > 1e-3
    finally:
        trainer.close()


def test_out_of_memory_names_the_contrastive_batch_and_what_to_lower(single_rank, world_dir, tmp_path, capsys):
    from fastclip.errors import OutOfMemory

    trainer = _trainer(single_rank, world_dir, tmp_path, ["--train.grad_accum", "4", "--data.batch_size", "8"])

    def too_big(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trainer.accumulation.loss_fn = too_big
    try:
        trainer._announce()
        assert "contrastive batch 32: accumulation 'contrastive', one loss over 4 micro batches of 8" in (
            capsys.readouterr().out
        )
        with pytest.raises(OutOfMemory) as caught:
            trainer.train_step(iter(trainer.train_loader))
    finally:
        trainer.close()
    message = str(caught.value)
    assert "contrastive batch of 32 (4 micro batches of 8 per rank x 1 ranks)" in message
    assert "data.batch_size" in message and "train.grad_accum" in message and "Tried to allocate 20.00 GiB" in message


def test_independent_accumulation_is_announced_with_its_smaller_contrastive_batch(
    single_rank, world_dir, tmp_path, capsys
):
    extra = ["--train.grad_accum", "4", "--data.batch_size", "8", "--train.accum_mode", "independent"]
    trainer = _trainer(single_rank, world_dir, tmp_path, extra)
    try:
        assert trainer.accumulation is None and trainer.global_batch == 32 and trainer.contrastive_batch == 8
        trainer._announce()
    finally:
        trainer.close()
    assert "contrastive batch 8: accumulation 'independent', 4 micro batches of 8 per rank" in capsys.readouterr().out


def _toy(seed: int = 0):
    """Two towers with batch norms, as ``forward`` gives them: a batch to features and a logit scale."""
    from fastclip.data.batch import Batch

    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {
            "image": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)),
            "text": torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)),
        }
    )
    model.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(batch: Batch) -> dict:
        return {"image_features": model["image"](batch.images), "text_features": model["text"](batch.texts),
                "logit_scale": model.logit_scale.exp()}  # fmt: skip

    g = torch.Generator().manual_seed(seed)
    micro = [Batch(images=torch.randn(6, 8, generator=g), texts=torch.randn(6, 8, generator=g)) for _ in range(3)]
    return model, forward, micro


@pytest.mark.parametrize("keep_last_graph", [True, False])
def test_batch_norm_statistics_count_each_micro_batch_once(keep_last_graph):
    from fastclip.accumulation import ContrastiveAccumulation
    from fastclip.loss import ClipLoss

    model, forward, micro = _toy()
    accumulation = ContrastiveAccumulation(
        forward, ClipLoss(), device=torch.device("cpu"), model=model, keep_last_graph=keep_last_graph
    )
    cache = accumulation.cache(micro)
    for surrogate in accumulation.backward_passes(cache, micro):
        surrogate.backward()
    reference, ref_forward, _ = _toy()
    with torch.no_grad():
        for batch in micro:  # each micro batch through the towers once
            ref_forward(batch)
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(ours, theirs, msg=lambda m, n=name: f"{n}: {m}")
    assert int(model["image"][1].num_batches_tracked) == 3
    assert model.logit_scale.grad is not None and model["image"][0].weight.grad.abs().sum() > 0


def test_a_step_cut_short_by_the_data_keeps_the_position(single_rank, world_dir, tmp_path):
    trainer = _trainer(single_rank, world_dir, tmp_path, ["--train.grad_accum", "3", "--data.batch_size", "8"])
    try:
        batches = iter(trainer.train_loader)
        trainer.train_step(batches)
        position = trainer.data_position
        two = iter([next(batches), next(batches)])
        with pytest.raises(StopIteration):
            trainer.train_step(two)
        assert trainer.data_position == position and trainer.step == 1  # the two batches were not trained on
    finally:
        trainer.close()
