"""DDP over two real gloo processes: the frozen base is never sent between ranks (neither when DDP wraps the model
nor at each forward), while the LoRA's parameters are broadcast once and its gradients averaged."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raytune_sd3.train.strategy import skip_frozen_sync


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
