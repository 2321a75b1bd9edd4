"""Many nodes on one machine: two simulated nodes of two CPU ranks each (gloo on loopback), each node started by its
own launcher as on a cluster: ``deepspeed --no_ssh --node_rank R`` and ``torchrun --nnodes 2 --node-rank R``;
SLURM's ``srun`` by its variables alone. A rank killed mid-run, a node that never starts, ranks that disagree, a
checkpoint resumed on 2 and 1 ranks, the standalone export of a 4-rank ZeRO-3 checkpoint."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastclip.world import TORCHRUN_WAITS, free_port

from runs import ROOT, TRAIN, clean_env, node_launch, rank_pids, run_cli, small_run_args, torchrun_cmd, wait_all

pytestmark = pytest.mark.slow

LOST_AFTER, HEARTBEAT = 8, 1  # dist.lost_after_s and dist.heartbeat_s of the killed run
LAYOUT = "4 ranks on 2 node(s) x 2 (node 0 "
KEYS = {
    "step", "epoch", "samples_seen", "loss", "lr", "logit_scale", "samples_per_second",
    "samples_per_second_per_gpu", "data_time", "batch_time", "grad_norm",
}  # fmt: skip


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _check(outputs: list[str], procs) -> None:
    for out, proc in zip(outputs, procs):
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-5000:]}"


def _two_nodes(kind, port, args, tmp, **kw):
    return [node_launch(kind, n, nodes=2, per_node=2, port=port, args=args, tmp=tmp, **kw) for n in (0, 1)]


@pytest.fixture(scope="module")
def killed_and_resumed(world_dir, tmp_path_factory):
    """A 4-rank ZeRO-3 fp32 run as two deepspeed --no_ssh nodes: rank 3 killed after the first checkpoint, then
    resumed from latest for two more steps (evaluating with zero-shot, checkpointing and exporting at the end)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    out = tmp / "run"
    args = small_run_args(world_dir, out, steps=10_000, batch=8) + [
        "--train.zero_stage", "3", "--train.precision", "fp32", "--checkpoint.every", "2",
        "--dist.heartbeat_s", str(HEARTBEAT), "--dist.lost_after_s", str(LOST_AFTER),
    ]  # fmt: skip
    procs = _two_nodes("deepspeed", free_port(), args, tmp)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000002"):
        assert all(p.poll() is None for p in procs), wait_all(procs)
        time.sleep(0.2)
    pids = rank_pids(3, out)
    assert pids, f"no rank 3 process with --log.dir {out}"
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    killed = wait_all(procs, timeout=120)
    gone = time.monotonic() - killed_at
    saved = int(latest.read_text().strip().split("_")[1])
    resume = small_run_args(world_dir, out, steps=saved + 2, batch=8) + [
        "--train.zero_stage", "3", "--train.precision", "fp32", "--checkpoint.resume", "latest",
    ]  # fmt: skip
    again = _two_nodes("deepspeed", free_port(), resume, tmp)
    resumed = wait_all(again)
    _check(resumed, again)
    return SimpleNamespace(out=out, killed=killed, procs=procs, gone=gone, saved=saved, resumed=resumed)


def test_killed_rank_ends_every_rank_in_bounded_time_and_latest_resumes(killed_and_resumed):
    run = killed_and_resumed
    assert all(p.returncode != 0 for p in run.procs)
    # node 1's launcher ends rank 2 at once; node 0's ranks find ranks 2 and 3 silent after dist.lost_after_s
    assert run.gone < LOST_AFTER + HEARTBEAT + 20, f"{run.gone:.1f} s"
    node0 = run.killed[0]
    # which of node 1's ranks is named first is a race: rank 2's last heartbeat may predate the kill of rank 3 by up
    # to dist.heartbeat_s, and its silence then reaches dist.lost_after_s first (seen once in ~10 runs)
    assert "fastclip (rank 0): stopping at step" in node0, node0[-3000:]
    assert re.search(r"rank [23] \(node 1, host", node0), node0[-3000:]
    assert "killed, out of memory, or its node lost" in node0 and "continue with --checkpoint.resume latest" in node0
    assert f"The newest checkpoint ({run.out / 'checkpoints'}/step_" in node0
    assert "Traceback" not in node0
    node0, node1 = run.resumed
    assert LAYOUT in node0 and f"resumed from {run.out / 'checkpoints'}/step_{run.saved:08d} at step" in node0
    assert "the train stream goes on from the checkpoint's position" in node0


def test_four_ranks_as_two_nodes_log_evaluate_and_save_once(killed_and_resumed):
    run = killed_and_resumed
    records = _records(run.out)
    after = records[next(i for i, r in enumerate(records) if "resumed_from" in r) + 1 :]
    steps = [r["step"] for r in after if "loss" in r]
    assert steps == [run.saved + 1, run.saved + 2]  # rank 0 alone writes: each step once
    assert all(
        r["samples_per_second_per_gpu"] == pytest.approx(r["samples_per_second"] / 4) for r in after if "loss" in r
    )
    before = [r["step"] for r in records[: len(records) - len(after)] if "loss" in r]
    assert before == sorted(set(before)) and before[:2] == [1, 2]  # the killed run's steps, each logged once
    assert [r["step"] for r in after if "val/zeroshot_top1" in r] == [run.saved + 2]  # ZeRO-3: gathered for eval
    ckpt = run.out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{run.saved + 2:08d}"
    folder = ckpt / f"step_{run.saved + 2:08d}"
    assert sorted(p.name for p in folder.glob("data_rank*.json")) == [f"data_rank{r:05d}.json" for r in range(4)]
    assert len(list(folder.glob("zero_pp_rank_*_model_states.pt"))) == 4  # ZeRO-3: one partition per rank
    assert json.loads((folder / "fastclip.json").read_text())["world_size"] == 4


def test_export_of_a_four_rank_zero3_checkpoint_embeds_as_the_trainer(killed_and_resumed, tmp_path):
    import open_clip

    from fastclip.model import resolve_model_name

    ckpt = killed_and_resumed.out / "checkpoints"
    out = tmp_path / "exported.pt"
    proc = run_cli([sys.executable, "-m", "fastclip.export", str(ckpt), "--out", str(out)], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = resolve_model_name("fastclip-tiny")
    ours = open_clip.create_model(name, pretrained=str(out), force_image_size=32)
    trainers = open_clip.create_model(name, pretrained=str(ckpt / "open_clip.pt"), force_image_size=32)
    images, texts = torch.randn(5, 3, 32, 32), open_clip.get_tokenizer(name)(["a red circle", "two", "", "x", "y"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), trainers.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(texts), trainers.encode_text(texts), rtol=1e-5, atol=1e-5)


def _copy(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run.out / "checkpoints", out / "checkpoints")
    return out


def test_four_rank_checkpoint_resumes_on_two_ranks_and_on_one(killed_and_resumed, world_dir, tmp_path, single_rank):
    """Saved at 4 ranks (ZeRO-3): resumed at 2 ranks and at 1, through DeepSpeed's universal format; the loaded
    weights are the checkpoint's, and training goes on from its step. At ZeRO-2 it is refused, saying why."""
    from fastclip.cli import parse_args
    from fastclip.export import fp32_weights
    from fastclip.reshard import ReshardError
    from fastclip.trainer import Trainer

    run = killed_and_resumed
    step = run.saved + 2
    saved = fp32_weights(run.out / "checkpoints" / f"step_{step:08d}")
    out = _copy(run, tmp_path)
    args = small_run_args(world_dir, out, steps=step + 1, batch=8) + [
        "--train.precision", "fp32", "--checkpoint.resume", "latest", "--eval.zeroshot", "false",
        "--checkpoint.export_open_clip", "false",
    ]  # fmt: skip
    cmd = torchrun_cmd(2, free_port(), ROOT / "tests" / "resume_worker.py")
    proc = run_cli(cmd + ["--out", str(tmp_path / "two.pt"), *args, "--train.zero_stage", "3"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "to DeepSpeed's universal format in" in proc.stdout and "was saved on 4 ranks, ZeRO-3, fp32" in proc.stdout
    assert "data: the train stream starts afresh (world_size changed since the checkpoint)" in proc.stdout
    two = torch.load(tmp_path / "two.pt")
    assert two["step"] == step
    for name, value in saved.items():
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in _records(out) if "loss" in r][-1:] == [step + 1]

    out1 = _copy(run, tmp_path / "one")
    one_args = small_run_args(world_dir, out1, steps=step + 1, batch=8) + args[-8:] + ["--data.val_shards", "null"]
    with pytest.raises(ReshardError, match="converts ZeRO-3 checkpoints for ZeRO-3 only"):
        Trainer(parse_args(one_args + ["--train.zero_stage", "2"]), single_rank)
    trainer = Trainer(parse_args(one_args + ["--train.zero_stage", "3"]), single_rank)
    try:
        assert trainer.step == step
        loaded = trainer.checkpoints._full_state()
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
        trainer.train()
        assert trainer.step == step + 1
    finally:
        trainer.close()


def test_checkpoint_of_another_model_is_refused_before_any_step(killed_and_resumed, world_dir, tmp_path, single_rank):
    from fastclip.cli import parse_args
    from fastclip.errors import ConfigError
    from fastclip.trainer import Trainer

    out = _copy(killed_and_resumed, tmp_path)
    args = small_run_args(world_dir, out, steps=1000, batch=8) + ["--checkpoint.resume", "latest"]
    with pytest.raises(ConfigError, match="holds another model") as e:
        Trainer(parse_args(args + ["--model.force_image_size", "48", "--data.val_shards", "null"]), single_rank)
    assert "1 differ, first visual.positional_embedding [17, 192] -> [37, 192]" in str(e.value)


# ------------------------------------------------------------------------------------------------ torchrun


def test_two_nodes_by_torchrun_train_evaluate_checkpoint_and_resume_on_one_rank(world_dir, tmp_path, single_rank):
    """Two torchrun nodes train, evaluate and save (ZeRO-2); one rank resumes at ZeRO-1 with the weights they saved and
    trains the next step. (A resume on four ranks: the killed run's, above, by the deepspeed launcher.)"""
    from fastclip.cli import parse_args
    from fastclip.export import fp32_weights, step_folder
    from fastclip.trainer import Trainer

    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=3, batch=8) + ["--train.grad_accum", "2", "--checkpoint.every", "2",
                                                                 "--optim.lr", "2e-3"]  # fmt: skip
    procs = _two_nodes("torchrun", free_port(), args, tmp_path)
    outputs = wait_all(procs)
    _check(outputs, procs)
    assert LAYOUT in outputs[0] and "contrastive batch 64: accumulation 'contrastive'" in outputs[0]
    assert TORCHRUN_WAITS in outputs[0]  # how to bound torchrun's own wait for a node that never starts
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val/zeroshot_top1" in r] == [3]
    assert all(r["samples_seen"] == r["step"] * 64 and KEYS <= set(r) for r in records if "loss" in r)

    saved = fp32_weights(step_folder(out / "checkpoints"))
    more = small_run_args(world_dir, out, steps=4, batch=8) + ["--train.grad_accum", "2", "--checkpoint.resume",
           "latest", "--train.zero_stage", "1", "--eval.zeroshot", "false", "--data.val_shards", "null"]  # fmt: skip
    trainer = Trainer(parse_args(more), single_rank)
    try:
        assert trainer.step == 3
        loaded = trainer.checkpoints._full_state()
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
        trainer.train()
    finally:
        trainer.close()
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_ranks_of_two_nodes_read_disjoint_samples_covering_the_epoch(tmp_path):
    from test_data_integrity import _captioned_shards, _ids

    spec, captions = _captioned_shards(tmp_path / "shards", [13, 17, 11, 19, 7, 23, 17])
    procs = _two_nodes("torchrun", free_port(), ["--out", str(tmp_path), "--shards", spec], tmp_path,
                       script=ROOT / "tests" / "data_worker.py", env={"PYTHONPATH": str(ROOT / "tests")})  # fmt: skip
    _check(wait_all(procs), procs)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not set(seen[a]) & set(seen[b]), f"ranks {a} and {b} read the same samples"
    everything = [t for s in seen for t in s]
    assert len(everything) == len(set(everything)) == 4 * (len(captions) // 4)  # an epoch: 26 steps of 4 ranks
    assert set(everything) <= set(_ids(captions))


# ------------------------------------------------------------------------------------------ SLURM, bad input


# rank 1 stops on an error of its own at step 3 (a DataBroken, as its loader would raise)
_FAILING_RANK = """
import sys
from fastclip import trainer
from fastclip.data.skips import DataBroken
from fastclip.train import main

step = trainer.Trainer.train_step
def failing(self, batches):
    if self.world.rank == 1 and self.step == 2:
        raise DataBroken("rank 1's shards: injected failure")
    return step(self, batches)
trainer.Trainer.train_step = failing
sys.argv[0] = "fastclip/train.py"
main()
"""


def _slurm_job_id() -> str:
    """A job id whose port (fastclip.world derives MASTER_PORT from it, as on a cluster) is free now: a fixed one
    collides with a second suite on this machine."""
    from fastclip.world import slurm_environment

    while True:
        job = str(random.randrange(1, 10**6))
        env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job}
        with socket.socket() as sock:
            try:
                sock.bind(("", int(slurm_environment(env)["MASTER_PORT"])))
            except OSError:
                continue
        return job


def _slurm(world_dir, tmp_path, args_by_rank, *, timeout=300, steps=2, code=None):
    """One process per rank, started as srun starts tasks: no launcher, only SLURM's variables."""
    procs, run = [], small_run_args(world_dir, tmp_path / "run", steps=steps) + ["--eval.zeroshot", "false"]
    job = _slurm_job_id()
    for rank, extra in enumerate(args_by_rank):
        env = {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": str(len(args_by_rank)), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": job,
               }  # fmt: skip
        entry = ["-c", code] if code else [str(TRAIN)]
        cmd = [sys.executable, *entry, *run, *extra]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(env), **pipes))
    return [(p, *p.communicate(timeout=timeout)) for p in procs]


def test_srun_without_a_launcher_maps_the_slurm_variables_to_ranks(world_dir, tmp_path):
    results = _slurm(world_dir, tmp_path, [["--train.zero_stage", "1"]] * 2)
    for proc, out, err in results:
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "2 ranks on 1 node(s) x 2 (node 0 " in results[0][1]
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [1, 2]


def test_a_rank_that_fails_tells_the_others_at_once(world_dir, tmp_path):
    beat = ["--dist.heartbeat_s", "1", "--dist.lost_after_s", "300"]  # silence alone would take 300 s
    start = time.monotonic()
    (zero, out0, err0), (one, _, err1) = _slurm(world_dir, tmp_path, [beat, beat], steps=1000, code=_FAILING_RANK)
    assert time.monotonic() - start < 120 and zero.returncode == 1 and one.returncode == 1
    assert "fastclip (rank 1): rank 1's shards: injected failure" in err1
    assert "fastclip (rank 0): stopping at step" in err0 and "rank 1 (node 0, host" in err0, err0[-3000:]
    assert "stopped at step 2: rank 1's shards: injected failure" in err0


def test_ranks_that_disagree_on_the_config_stop_before_any_model(world_dir, tmp_path):
    results = _slurm(world_dir, tmp_path, [[], ["--data.batch_size", "8"]])
    assert [p.returncode for p, _, _ in results] == [2, 2]
    err = results[0][2]
    assert "the ranks disagree on the run" in err and "rank 1 (node 0, host" in err and "data.batch_size 16 -> 8" in err
    assert all("params" not in out for _, out, _ in results)


def test_a_node_that_never_starts_is_named_after_the_join_timeout(world_dir, tmp_path):
    args = small_run_args(world_dir, tmp_path / "run", steps=2) + ["--dist.join_timeout_s", "5"]
    start = time.monotonic()
    port = free_port()
    [node0] = [node_launch("deepspeed", 0, nodes=2, per_node=2, port=port, args=args, tmp=tmp_path)]
    [out] = wait_all([node0], timeout=120)
    assert node0.returncode != 0 and time.monotonic() - start < 90
    assert f"ranks 2-3 of 4 did not join the rendezvous at 127.0.0.1:{port} within dist.join_timeout_s=5 s" in out
    assert "(ranks 0-1 did)" in out and "params" not in out


def test_slurm_node_lists_expand_as_scontrol_does():
    from fastclip.world import expand_nodelist, slurm_environment

    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("a[1-2]-ib,b") == ["a1-ib", "a2-ib", "b"]
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[08-09]",
           "SLURM_JOB_ID": "123"}  # fmt: skip
    assert slurm_environment(env) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "n08",
                                      "MASTER_PORT": "21968"}  # fmt: skip
    assert slurm_environment({**env, "RANK": "0"}) == {}  # a launcher inside the allocation wins
