"""A resumed run goes on with the samples the interrupted run had not reached, in the same order."""

import pytest

from fastclip.config import parse_args

from runs import small_run_args


def _recording(trainer, seen: list):
    fetch = trainer.fetch

    def recorded(batches):
        batch = fetch(batches)
        seen.append([tuple(t.tolist()) for t in batch.texts])
        return batch

    trainer.fetch = recorded
    return trainer


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_resume_replays_the_samples_after_the_checkpoint(single_rank, world_dir, tmp_path, capsys, loader):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=40) + ["--log.every", "1000", "--data.loader", loader]
    seen_first: list = []
    first = _recording(Trainer(parse_args(args), single_rank), seen_first)
    try:
        batches = iter(first.train_loader)
        for _ in range(38):  # 608 samples: the checkpoint falls in the second epoch
            first.train_step(batches)
            if first.step == 35:
                first.save()
    finally:
        first.close()
    assert (tmp_path / "run" / "checkpoints" / "step_00000035" / "data_rank00000.json").is_file()
    seen_again: list = []
    again = _recording(Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank), seen_again)
    try:
        assert again.step == 35
        batches = iter(again.train_loader)
        for _ in range(3):
            again.train_step(batches)
    finally:
        again.close()
    assert seen_again == seen_first[35:38]
    assert "goes on from the checkpoint's position" in capsys.readouterr().out


def test_changed_batch_size_starts_the_stream_afresh(single_rank, world_dir, tmp_path, capsys):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=4) + ["--log.every", "1000"]
    first = Trainer(parse_args(args), single_rank)
    try:
        batches = iter(first.train_loader)
        first.train_step(batches)
        first.save()
    finally:
        first.close()
    again = Trainer(parse_args(args + ["--checkpoint.resume", "latest", "--data.batch_size", "8"]), single_rank)
    again.close()
    assert again.step == 1
    assert "starts afresh (batch_size changed since the checkpoint)" in capsys.readouterr().out
    other = Trainer(parse_args(args + ["--checkpoint.resume", "latest", "--data.loader", "torch"]), single_rank)
    other.close()
    assert "starts afresh (the position was saved by the dali loader, this is the torch loader)" in (
        capsys.readouterr().out
    )
