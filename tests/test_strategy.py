"""DDP over two real gloo processes: the frozen base is never sent between ranks (neither when DDP wraps the model
nor at each forward), while the LoRA's parameters are broadcast once and its gradients averaged."""

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raytune_sd3.config import load_job
from raytune_sd3.train.strategy import clip_gradients, skip_frozen_sync

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(port, out), nprocs=2, start_method="spawn")
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
