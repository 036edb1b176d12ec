"""BatchNormStatistics: FastDFKD's momentum variant (Eq. 15) and the distributed (all-reduced) batch
statistics, checked by hand on one channel and against a real 2-process gloo launch."""

import importlib.util
import subprocess

import pytest
import torch

from accelerate_dfkd import hooks
from accelerate_dfkd.hooks import BatchNormStatistics, BNMomentumState

from .conftest import PYTHON, REPO, cli_env

PROBE = REPO / "tests/scripts/bn_stats_probe.py"


def _one_bn() -> torch.nn.Module:
    bn = torch.nn.BatchNorm2d(1)
    bn.running_mean.fill_(0.0)
    bn.running_var.fill_(1.0)
    return torch.nn.Sequential(bn).eval()


def _batch(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_momentum_loss_matches_eq15_by_hand():
    model, state = _one_bn(), BNMomentumState()
    # Round 1, batch A = [1, 3]: mean 2, biased var ((1-2)^2 + (3-2)^2) / 2 = 1. No accumulator yet,
    # so the plain loss: |0 - 2| + |1 - 1| = 2.
    with BatchNormStatistics(model, momentum=0.9, state=state) as bn:
        model(_batch(1.0, 3.0))
        assert bn.loss().item() == pytest.approx(2.0)
        bn.update_momentum()  # first update: accumulator := last batch statistics = (2, 1)
    assert state.mean[0].item() == pytest.approx(2.0) and state.var[0].item() == pytest.approx(1.0)
    assert not state.mean[0].requires_grad
    # Round 2, batch B = [0, 2]: mean 1, var 1. Compared statistics (Eq. 15, m = 0.9):
    # mean 0.1 * 1 + 0.9 * 2 = 1.9, var 0.1 * 1 + 0.9 * 1 = 1, so loss = |0 - 1.9| + |1 - 1| = 1.9.
    with BatchNormStatistics(model, momentum=0.9, state=state) as bn:
        model(_batch(0.0, 2.0))
        assert bn.loss().item() == pytest.approx(1.9)
        state.update(bn)  # acc := 0.9 * acc + 0.1 * last: mean 0.9 * 2 + 0.1 * 1 = 1.9, var 0.9 + 0.1 = 1
    assert state.mean[0].item() == pytest.approx(1.9) and state.var[0].item() == pytest.approx(1.0)
    # momentum 0 ignores the accumulator: plain loss of B = |0 - 1| + |1 - 1| = 1
    with BatchNormStatistics(model, state=state) as bn:
        model(_batch(0.0, 2.0))
        assert bn.loss().item() == pytest.approx(1.0)
    assert _no_hooks(model)


def test_momentum_first_layer_weight_gradient_and_last_forward_used():
    model, state = _one_bn(), BNMomentumState()
    with BatchNormStatistics(model, first_layer_weight=3.0, momentum=0.9, state=state) as bn:
        model(_batch(5.0, 7.0))  # an earlier inner iteration: not the one the update uses
        bn.loss()
        model(_batch(1.0, 3.0))
        assert bn.loss().item() == pytest.approx(6.0)  # 3 * (|0 - 2| + 0)
        bn.update_momentum()
    assert state.mean[0].item() == pytest.approx(2.0)  # the last batch, not [5, 7]
    x = _batch(0.0, 2.0).requires_grad_(True)
    with BatchNormStatistics(model, first_layer_weight=3.0, momentum=0.9, state=state) as bn:
        model(x)
        loss = bn.loss()
    assert loss.item() == pytest.approx(3 * 1.9)
    loss.backward()
    # d/dx_i 3 * |0 - (0.1 * mean(x) + 1.8)| = 3 * 0.1 * (1/2) (the var term's gradient is 0 at var = 1:
    # |1 - (0.1 var + 0.9)| has d/dvar = -0.1 * sign(0) = 0 in torch)
    assert x.grad.flatten().tolist() == pytest.approx([0.15, 0.15])
    assert _no_hooks(model)


def test_state_round_trip_and_validation():
    model, state = _one_bn(), BNMomentumState()
    with BatchNormStatistics(model, momentum=0.9, state=state) as bn:
        with pytest.raises(RuntimeError):
            bn.update_momentum()  # nothing captured yet
        model(_batch(1.0, 3.0))
        bn.update_momentum()
    saved = state.state_dict()
    restored = BNMomentumState()
    restored.load_state_dict(saved)
    assert torch.equal(restored.mean[0], state.mean[0]) and torch.equal(restored.var[0], state.var[0])
    saved["mean"][0].fill_(100.0)  # the state dict holds copies
    assert state.mean[0].item() == pytest.approx(2.0)
    with BatchNormStatistics(model, momentum=0.9, state=restored) as bn:
        model(_batch(0.0, 2.0))
        assert bn.loss().item() == pytest.approx(1.9)
    two_bn = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.BatchNorm2d(1))
    with pytest.raises(ValueError, match="BatchNorm layers"):
        BatchNormStatistics(two_bn, momentum=0.9, state=restored)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormStatistics(model, momentum=1.0)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BatchNormStatistics(torch.nn.Linear(2, 2), momentum=0.9, state=BNMomentumState())
    assert _no_hooks(model) and _no_hooks(two_bn)


def test_distributed_falls_back_to_local_statistics_and_sum_formula_matches(monkeypatch):
    model = _one_bn()
    with BatchNormStatistics(model, distributed=True) as bn:  # torch.distributed not initialized
        model(_batch(1.0, 3.0))
        assert bn.loss().item() == pytest.approx(2.0)
    # the sums-and-counts formula (identity all-reduce = one rank) equals mean / biased var, float32
    monkeypatch.setattr(hooks, "_all_reduce_sum", lambda t: t)
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5) * 3 + 100.0).half()
    shift = torch.tensor([99.0, 101.0, 0.0])
    mean, var = hooks._global_batch_statistics(x.float(), shift)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, x.float().mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, x.float().var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)


def _load_probe():
    spec = importlib.util.spec_from_file_location("bn_stats_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
def test_two_process_loss_and_gradients_match_the_concatenated_batch(tmp_path):
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29641", str(PROBE),
           str(tmp_path)]
    env = cli_env()
    env["MASTER_PORT"] = "29641"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["hooks_left"] for r in ranks] == [0, 0]

    # the same computation in one process on the concatenated batch
    probe = _load_probe()
    model = probe.build_model()
    model.load_state_dict(ranks[0]["model"])
    state = BNMomentumState()
    xa = ranks[0]["batch_a"].clone().requires_grad_(True)
    with BatchNormStatistics(model, probe.FIRST_LAYER_WEIGHT, momentum=probe.MOMENTUM, state=state) as bn:
        model(xa)
        loss_a = bn.loss()
        loss_a.backward()
        bn.update_momentum()
    xb = ranks[0]["batch_b"].clone().requires_grad_(True)
    with BatchNormStatistics(model, probe.FIRST_LAYER_WEIGHT, momentum=probe.MOMENTUM, state=state) as bn:
        model(xb)
        loss_b = bn.loss()
        loss_b.backward()

    for r in ranks:
        # (a) every rank sees the loss of the global batch, plain and with momentum
        torch.testing.assert_close(r["loss_a"], loss_a.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["loss_b"], loss_b.detach(), rtol=1e-5, atol=1e-5)
        # (b) gradient convention: the all-reduce's backward sums over ranks, so each rank's backward of the
        # (identical) global loss gives world_size x its slice of the single-process gradient -- the DDP
        # scaling of a per-rank mean loss (see BatchNormStatistics docstring).
        sl = slice(*r["slice"])
        torch.testing.assert_close(r["grad_a"] / 2, xa.grad[sl], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["grad_b"] / 2, xb.grad[sl], rtol=1e-5, atol=1e-5)
        # the momentum accumulators are the global statistics, identical on every rank
        for key in ("mean", "var"):
            for got, want in zip(r["state"][key], state.state_dict()[key]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
