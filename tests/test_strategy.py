"""DDP over two real gloo processes: the frozen base is never sent between ranks (neither when DDP wraps the model
nor at each forward), while the LoRA's parameters are broadcast once and its gradients averaged."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from raytune_sd3.config import load_job
from raytune_sd3.train.strategy import clip_gradients, decides_skip_on_device, read_step, skip_frozen_sync
from tests.conftest import run_gloo_ranks

ROOT = Path(__file__).resolve().parents[1]


class Base(nn.Module):
    """A frozen layer and buffer (as SD3's base and pos_embed) under a trainable adapter (as the LoRA)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.adapter = nn.Linear(4, 4)
        self.register_buffer("pos", torch.zeros(4))

    def forward(self, x):
        return self.adapter(self.frozen(x) + self.pos)


def _rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # every weight differs between the ranks
    model = Base()
    with torch.no_grad():
        model.pos.fill_(float(rank + 1))
    skipped = skip_frozen_sync(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.ones(2, 4)).sum().backward()  # a forward would re-broadcast buffers by default
    grads = [p.grad.clone() for p in model.adapter.parameters()]
    out[rank] = {"skipped": sorted(skipped), "frozen": model.frozen.weight.detach().clone(),
                 "pos": model.pos.clone(), "adapter": model.adapter.weight.detach().clone(), "grads": grads}
    dist.destroy_process_group()


def test_ddp_sends_the_lora_but_never_the_frozen_base():
    out = run_gloo_ranks(_rank)
    r0, r1 = out[0], out[1]
    assert r0["skipped"] == ["frozen.bias", "frozen.weight", "pos"]
    # Frozen weights and buffers stay each rank's own: nothing of them crossed.
    assert not torch.equal(r0["frozen"], r1["frozen"])
    assert r0["pos"].tolist() == [1.0] * 4 and r1["pos"].tolist() == [2.0] * 4
    # The trainable layer was broadcast from rank 0 and its gradients averaged: equal on both ranks.
    assert torch.equal(r0["adapter"], r1["adapter"])
    for g0, g1 in zip(r0["grads"], r1["grads"], strict=True):
        assert torch.allclose(g0, g1)


def _twin_grads() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Two identical small networks with the same real gradients (one backward pass each)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    b = copy.deepcopy(a)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for net in (a, b):
        nn.functional.mse_loss(net(x), y).backward()
    return list(a.parameters()), list(b.parameters())


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_clip_gradients_equals_torch(mode):
    """train.grad_clip value clips each gradient entry at max_grad_norm (torch's clip_grad_value_), norm the global
    norm (clip_grad_norm_); either way the logged norm is the global one before clipping."""
    ours, ref = _twin_grads()
    before = torch.nn.utils.get_total_norm([p.grad for p in ref])
    threshold = 0.05
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"train.grad_clip={mode}", f"train.max_grad_norm={threshold}"])
    norm = clip_gradients(ours, cfg)
    if mode == "value":
        torch.nn.utils.clip_grad_value_(ref, threshold)
    else:
        torch.nn.utils.clip_grad_norm_(ref, threshold)
    torch.testing.assert_close(norm, before)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    if mode == "value":  # the threshold cuts some entries, not all
        grads = torch.cat([q.grad.flatten() for q in ref])
        assert 0 < (grads.abs() == threshold).sum() < grads.numel()
    else:
        assert before > threshold


class _ScalarReads(TorchDispatchMode):
    """Counts reads of one tensor element into Python (.item(), float(), bool(), math.isfinite(t)): each is a
    host-device sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_a_step_reads_the_device_once_and_the_device_skip_equals_the_host_skip(monkeypatch):
    """clip_and_step with torch's fused AdamW (on GPUs the default; it takes found_inf, so the skip of a non-finite
    step is decided on the device) against the plain AdamW (the host reads the loss first): the same updates, a
    non-finite step leaves weights, moments and step count untouched in both, and each step reads device values
    into Python exactly once (read_step, after the update is queued where fused), never through .item() or float()."""
    import raytune_sd3.train.strategy as strategy

    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["train.max_grad_norm=0.5"])
    reads = []
    monkeypatch.setattr(strategy, "read_step", lambda *a: reads.append(1) or read_step(*a))
    torch.manual_seed(0)  # an initialisation whose gradient norms exceed the clip at both finite steps
    models = {fused: nn.Linear(4, 3) for fused in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    optimizers = {fused: torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused) for fused, m in models.items()}
    assert decides_skip_on_device(optimizers[True]) and not decides_skip_on_device(optimizers[False])
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for step, scale in enumerate([1.0, math.nan, 1.0, math.inf]):
        results, before = {}, {f: copy.deepcopy((m.state_dict(), optimizers[f].state_dict())) for f, m in models.items()}
        for fused, model in models.items():
            loss = model(x).pow(2).mean() * scale
            loss.backward()
            with _ScalarReads() as counter:
                results[fused] = strategy.clip_and_step(list(model.parameters()), optimizers[fused], loss.detach(), cfg)
            # The plain AdamW reads its step counters, which live on the CPU (no sync); the fused one reads nothing.
            host_counters = 0 if fused or not math.isfinite(scale) else len(optimizers[fused].state)
            assert counter.count == host_counters, (step, fused)
        assert len(reads) == 2 * (step + 1)
        assert results[True].stepped == results[False].stepped == math.isfinite(scale)
        for fused, model in models.items():
            state = optimizers[fused].state_dict()["state"]
            if not math.isfinite(scale):  # untouched: weights, moments and Adam's step count
                torch.testing.assert_close(model.state_dict(), before[fused][0], rtol=0, atol=0)
                torch.testing.assert_close(state, before[fused][1]["state"], rtol=0, atol=0)
            else:
                assert all(float(s["step"]) == 1 + step // 2 for s in state.values())
        torch.testing.assert_close(models[True].state_dict(), models[False].state_dict(), rtol=1e-6, atol=1e-7)
        if math.isfinite(scale):
            assert results[True].loss == pytest.approx(results[False].loss, rel=1e-6)
            assert results[True].grad_norm == pytest.approx(results[False].grad_norm, rel=1e-6)
            assert results[True].grad_norm > 0.5  # clipped: the update used the clipped gradient in both


def test_a_fused_optimizer_is_stepped_before_the_host_read_and_told_to_skip_on_the_device(monkeypatch):
    """Why the device-side skip exists: with torch's fused AdamW the update is queued first, with found_inf set
    from the loss and gradient norm on the device, and only then are the step's scalars read (the GPU never waits
    for the host between backward and update). The plain AdamW is read first and stepped only when finite."""
    import raytune_sd3.train.strategy as strategy

    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["train.max_grad_norm=0.5"])
    events: list = []
    monkeypatch.setattr(strategy, "read_step", lambda *a: events.append("read") or read_step(*a))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for fused in (True, False):
        model = nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: events.append(("step", getattr(opt, "found_inf", None))))
        for scale in (1.0, math.nan):
            events.clear()
            loss = model(x).pow(2).mean() * scale
            loss.backward()
            strategy.clip_and_step(list(model.parameters()), optimizer, loss.detach(), cfg)
            if fused:  # queued either way; the device skips the non-finite one (found_inf 1)
                assert events == [("step", torch.tensor(0.0 if math.isfinite(scale) else 1.0)), "read"], events
            else:
                assert events == (["read", ("step", None)] if math.isfinite(scale) else ["read"]), events
