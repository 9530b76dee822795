"""The speed options of the loop keep its results: read-ahead batches (in a thread or not) are the reader's batches in
order, entries kept in RAM are the stored ones and stay within their budget, and a compiled transformer computes
what the eager one does with the same parameter names."""

import copy
import shutil

import pytest
import torch

from raytune_sd3.config import LoraConfig
from raytune_sd3.data.reader import CachedBatches, EntriesInMemory, Prefetcher
from raytune_sd3.data.store import CacheStore
from raytune_sd3.models.loading import compile_blocks, load_transformer
from raytune_sd3.models.lora import add_lora
from tests.test_buckets import _fake_cache


def test_prefetched_batches_are_the_readers_in_order(tmp_path):
    manifest, rows = _fake_cache(tmp_path, {"wide": (96, 48, 8), "square": (64, 64, 8)})
    reader = CachedBatches(manifest, rows, seed=2, global_batch=4)
    calls = [(s, m, 2, r, 2, 1) for s in range(7) for m in range(2) for r in (0, 1)][::2]  # rank 0's share
    for background in (True, False):
        ahead = Prefetcher(reader, calls, depth=2, background=background)
        for args in calls:
            got, want = ahead.get(), reader.micro_batch(*args)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        with pytest.raises(StopIteration):
            ahead.get()
        ahead.close()
        assert ahead._thread is None or not ahead._thread.is_alive()

    # The entries go missing before the reader starts: a thread reads ahead from its construction on.
    (tmp_path / "latents").rename(tmp_path / "gone")
    for background in (True, False):
        broken = Prefetcher(reader, [(0, 0, 1, 0, 1, 4)], background=background)  # 1 x 1 x 4 is the global batch
        with pytest.raises(FileNotFoundError):
            broken.get()
        broken.close()
    stopped = Prefetcher(reader, [(s, 0, 1, 0, 1, 4) for s in range(1000)], depth=1)
    stopped.close()  # a run that stops early (divergence) leaves no thread behind
    assert not stopped._thread.is_alive()


def test_entries_in_memory_hold_what_fits_and_read_the_rest_each_time(tmp_path):
    manifest, rows = _fake_cache(tmp_path, {"square": (64, 64, 6)})  # latents 16x8x8 fp32: 4096 bytes each
    keys = [r["latent_key"] for r in rows]
    memory = EntriesInMemory(CacheStore(tmp_path), budget=3 * 4096)
    first = [memory.read("latents", k) for k in keys]
    assert memory.used == 3 * 4096 and len(memory._entries) == 3  # the first three fit; no eviction after that
    (tmp_path / "latents").rename(tmp_path / "moved")  # the kept ones no longer need the files...
    for k, entry in zip(keys[:3], first[:3], strict=True):
        assert memory.read("latents", k) is entry
    with pytest.raises(FileNotFoundError):  # ...the others are read from the store every time
        memory.read("latents", keys[3])
    (tmp_path / "moved").rename(tmp_path / "latents")
    assert torch.equal(memory.read("latents", keys[4])["latents"], torch.full((16, 8, 8), 4.0))

    # The reader's batches are the same with a budget or without one
    plain = CachedBatches(manifest, rows, seed=5, global_batch=2, caption_dropout=0.5)
    kept = CachedBatches(manifest, rows, seed=5, global_batch=2, caption_dropout=0.5, memory_budget=2**20)
    for step in range(9):
        a, b = plain.micro_batch(step, 0, 1, 0, 1, 2), kept.micro_batch(step, 0, 1, 0, 1, 2)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(kept.entries._entries) == 7  # 6 latents and the one caption embedding, read once each


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_blocks_match_eager_share_graphs_and_keep_names(tiny_sd3):
    """train.compile compiles each block in place (compile_blocks): the forward and the LoRA's gradients equal eager,
    names are unchanged, and the blocks of a kind share one graph (Dynamo compiles one per kind, not one per block:
    here 5 joint blocks and a last, context-pre-only one: at most 3 graphs, where one per block would be 6)."""
    from diffusers import SD3Transformer2DModel
    from torch._dynamo.utils import counters

    config = {**load_transformer(tiny_sd3).config, "num_layers": 6}
    torch.manual_seed(0)
    eager = SD3Transformer2DModel.from_config(config).requires_grad_(False)
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        add_lora(model, LoraConfig(rank=4), seed=0)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled) == 6
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and saved LoRAs unchanged
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g), timestep=torch.tensor([500.0, 20.0]),
             encoder_hidden_states=torch.randn(2, 154, eager.config.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(2, eager.config.pooled_projection_dim, generator=g), return_dict=False)
    for model in (eager, compiled):
        model(**x)[0].square().mean().backward()
    torch.testing.assert_close(compiled(**x)[0], eager(**x)[0], rtol=1e-4, atol=1e-4)
    grads = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert 2 <= counters["stats"]["unique_graphs"] <= 3  # the joint kind (the first block may get its own), the last

