"""Run under a 2-process launch by tests/test_bn_statistics.py: the distributed BatchNorm-statistics
loss on a fixed batch split unevenly over 2 ranks (3 + 5 samples, so the all-reduced counts matter).

Each rank records its loss, the gradient w.r.t. its own slice, and (after a momentum update) the
momentum loss of a second batch and the accumulators; rank 0 also saves the model and both full batches
so the test can recompute everything in a single process.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from accelerate_dfkd.hooks import BatchNormStatistics, BNMomentumState

SPLIT = (3, 5)
FIRST_LAYER_WEIGHT = 2.0
MOMENTUM = 0.9


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval().requires_grad_(False)


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_model()
    generator = torch.Generator().manual_seed(1)
    batch_a = torch.randn(sum(SPLIT), 2, 5, 5, generator=generator) * 1.5 + 0.3
    batch_b = torch.randn(sum(SPLIT), 2, 5, 5, generator=generator) - 0.2
    start = sum(SPLIT[:rank])
    sl = slice(start, start + SPLIT[rank])

    state = BNMomentumState()
    x = batch_a[sl].clone().requires_grad_(True)
    with BatchNormStatistics(model, FIRST_LAYER_WEIGHT, momentum=MOMENTUM, state=state, distributed=True) as bn:
        model(x)
        loss_a = bn.loss()
        loss_a.backward()
        bn.update_momentum()
    x_b = batch_b[sl].clone().requires_grad_(True)
    with BatchNormStatistics(model, FIRST_LAYER_WEIGHT, momentum=MOMENTUM, state=state, distributed=True) as bn:
        model(x_b)
        loss_b = bn.loss()
        loss_b.backward()
    record = {"world_size": world, "rank": rank, "slice": (sl.start, sl.stop), "loss_a": loss_a.detach(),
              "grad_a": x.grad, "loss_b": loss_b.detach(), "grad_b": x_b.grad, "state": state.state_dict(),
              "hooks_left": sum(len(m._forward_hooks) for m in model.modules())}
    if rank == 0:
        record.update(model=model.state_dict(), batch_a=batch_a, batch_b=batch_b)
    torch.save(record, out / f"rank{rank}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    # Leave together: a rank that exits while the other is still inside a gloo collective can abort
    # ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
