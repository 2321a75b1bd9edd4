"""What fastclip changes in DeepSpeed's engine so that a non-logging step never waits for the device.

Found with :class:`fastclip.syncs.HostSyncAudit` on DeepSpeed 0.19 (tests/test_host_sync.py keeps them found):

- The throughput timer (on by default) calls ``synchronize()`` at every forward and every step: the derived
  DeepSpeed config turns it off (``timers.throughput.enabled: false``); fastclip times steps on its own.
- bf16 ``check_grad_overflow`` (on by default) reads every gradient for inf/NaN and ``.item()``s the result, then
  ``bool()``s the grad norm, every step: off unless ``optim.skip_nonfinite`` asks for it. Without it a
  non-finite loss stops the run at the next logging step (see fastclip/guard.py), as open_clip's bf16
  path would train on; a checkpoint is never written from such a state.
- ZeRO-1/2's ``unscale_and_clip_grads`` asks ``bool()`` of the grad norm to swap an invalid norm for +inf before
  clipping: :func:`sync_free_clipping` does the same swap with ``masked_fill`` on the device.
- ZeRO-1/2's grad norm marks an invalid norm with ``mask_nan_or_inf_with_val_inplace``, which builds the -1 as a
  device tensor from a host scalar (a blocking copy) and hands it to ``masked_fill_``, whose CUDA kernel reads
  it back (``.item()``): two syncs per step, seen by the first GPU run (H200, 2026-11-27; the CPU audit could not
  see them, it now counts a tensor-valued ``masked_fill``). :func:`sync_free_clipping` swaps in the same fill
  with a Python float.

ZeRO-0 under bf16 (DeepSpeed's unfused optimizer takes the grad norm with ``.item()`` per parameter) and
ZeRO-3 (its step decides on the host whether the norm is valid) keep their syncs; ZeRO-1 and 2 in bf16 have none.
In fp32 and amp_bf16 (fp32 partitions both), ZeRO-1/2's step reads the norm's validity on the host
(``is_invalid_grad_norm``) to skip a step with a non-finite gradient: one sync a step, kept (DeepSpeed's behaviour
for fp32 weights; bf16 skips nothing there and has none).
``zero_optimization.overlap_comm`` stays off (DeepSpeed's default for ZeRO-1/2): on CUDA its reduction path
calls ``synchronize()`` before reusing a gradient bucket.

Not a sync, but the host's time: ZeRO-1/2's grad norm converts each gradient of the partition to fp64 and takes
its norm one at a time, two kernels and an allocation per parameter tensor (~600 launches for ViT-B/32), 7 of 106
ms of a step's host time on a ViT-B/32-shaped model at width 64 (cProfile; benchmarks/bench_train_step.py's host
time case). :func:`sync_free_clipping` gives it one ``_foreach_norm`` whose per-tensor norms come out in fp32
whatever the gradients' dtype (bf16 under bf16 training, where bf16 norms would be ~1e-3 off), their squares
summed in fp64: DeepSpeed's value within 1e-5 (fp32 sums over a 6M-entry tensor).
"""

from __future__ import annotations

import types

import torch


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm) -> None:
    """DeepSpeedZeroOptimizer.unscale_and_clip_grads without the host read: an invalid norm (inf, NaN, or
    DeepSpeed's -1 sentinel) becomes +inf on the device, which scales the gradients by 0 exactly as the
    original does."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        norm = total_norm
        if not torch.is_tensor(norm):
            norm = torch.tensor(float(norm), dtype=torch.float, device=self.device)
        norm = norm.masked_fill(~torch.isfinite(norm) | (norm < 0), float("inf"))
        clip = ((norm / self.loss_scale) + 1e-6) / self.clip_grad
        combined_scale = torch.clamp(clip, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def _mask_nan_or_inf(input: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (which fills -1.0 whatever ``val`` says) with the fill
    value passed as a Python float: a kernel argument, no host-device traffic."""
    input.masked_fill_(input.isnan() | input.isinf(), -1.0)


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct's L2 norm of a partition's gradients, summed over the
    data-parallel group, with one ``_foreach_norm`` instead of a conversion and a norm per tensor. DeepSpeed's own
    runs where it does more than data parallelism (model or pipeline parallel parameters, another norm)."""
    import deepspeed.comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if (
        float(norm_type) != 2.0
        or pg_utils.is_parallel(self.model_parallel_group)
        or any(hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated for p in params)
    ):
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)

    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        total = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().square().sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    total = total.sqrt()
    _mask_nan_or_inf(total)
    return total


def sync_free_clipping(optimizer) -> bool:
    """Give a ZeRO-1/2 optimizer the sync-free, foreach grad norm and clipping above; True if it applied (False for
    other stages). The norm's mask is a global of DeepSpeed's ZeRO-1/2 module: replaced there, for every instance."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct, optimizer)
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_nan_or_inf
    return True
