"""LyCORIS LoKr / LoHa (lora.kind lokr | loha): trained on the tiny transformer, saved in LyCORIS's SD3 layout,
loaded back by the library itself with the trained output reproduced; checkpoints, the EMA, quantised bases and
validation images run through the adapter; bad settings refused at the door."""

import re

import pytest
import torch
from safetensors.torch import load_file

from raytune_sd3.config import ConfigError, LoraConfig, ValidationConfig, load_job
from raytune_sd3.models.loading import load_sampler, load_transformer, load_vae
from raytune_sd3.models.lora import (
    LORA_FILE,
    adapter_tensors,
    add_lora,
    export_lora,
    load_adapter_tensors,
    target_modules,
)
from raytune_sd3.models.quantize import quantize_transformer
from raytune_sd3.train.checkpoint import load_checkpoint, save_checkpoint
from raytune_sd3.train.ema import LoraEma
from raytune_sd3.train.validation import sample_images
from tests.test_lora import _inputs
from tests.test_lora_files import TINY
from tests.test_validation import embeds  # noqa: F401 - the module's fixture


def _train(model, params, steps: int = 3) -> None:
    """A few AdamW steps of the adapter towards a zero output (moves every factor off its init)."""
    opt = torch.optim.AdamW(params, lr=5e-2)
    for _ in range(steps):
        (model(**_inputs())[0] ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind,lycoris,tensors", [
    ("lokr", None, {"lokr_w1", "lokr_w2", "alpha"}),  # rank 4 >= half of 32/4: LyCORIS makes w2 whole
    ("lokr", {"factor": 2}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ("lokr", {"factor": 2, "full_matrix": True}, {"lokr_w1", "lokr_w2", "alpha"}),
    ("loha", None, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
])
def test_trained_adapter_loads_back_with_lycoris_and_gives_the_trained_output(tiny_sd3, tmp_path, kind, lycoris,
                                                                                tensors):
    from lycoris import create_lycoris_from_weights

    cfg = LoraConfig(rank=4, alpha=2.0, targets="attention+context", kind=kind, lycoris=lycoris)
    model = load_transformer(tiny_sd3)
    with torch.no_grad():
        base = model(**_inputs())[0]
    params = add_lora(model, cfg, seed=0)
    with torch.no_grad():
        assert torch.equal(model(**_inputs())[0], base)  # the update starts at zero
    _train(model, params)
    with torch.no_grad():
        ours = model(**_inputs())[0]
    assert (ours - base).abs().max() > 1e-3  # the adapter is not a no-op

    path = export_lora(tmp_path, adapter_tensors(model), cfg)
    assert path == tmp_path / LORA_FILE
    saved = load_file(str(path))
    # LyCORIS's SD3 layout: lycoris_<diffusers module path with _>.<factor>, one set per adapted layer
    layers = {re.sub(r"\.", "_", f"lycoris_{m}") for m in target_modules(model, cfg)}
    assert {k.split(".")[0] for k in saved} == layers
    assert {k.split(".", 1)[1] for k in saved} == tensors
    assert "lycoris_transformer_blocks_0_attn_add_q_proj.alpha" in saved
    if lycoris == {"factor": 2}:
        assert saved["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"].shape == (2, 2)

    fresh = load_transformer(tiny_sd3)
    network, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    network.apply_to()
    assert len(network.loras) == len(layers)
    with torch.no_grad():
        rebuilt = fresh(**_inputs())[0]  # the library's default: W + dW rebuilt (fp32 here: float rounding)
        for module in network.loras:
            module.bypass_mode = True  # as we train: W x + dW x
        bypassed = fresh(**_inputs())[0]
    torch.testing.assert_close(rebuilt, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bypassed, ours, rtol=0, atol=0)


def test_checkpoint_and_ema_keep_the_adapter(tiny_sd3, tmp_path):
    cfg = LoraConfig(rank=4, kind="lokr", lycoris={"factor": 2})
    model = load_transformer(tiny_sd3)
    params = add_lora(model, cfg, seed=0)
    ema = LoraEma(model, 0.5)
    _train(model, params)
    ema.update()
    trained = adapter_tensors(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(params, lr=1.0), lambda s: 1.0)
    save_checkpoint(tmp_path, trained, cfg, schedule, step=3)

    resumed = load_transformer(tiny_sd3)
    add_lora(resumed, cfg, seed=1)  # another init, which the checkpoint overwrites
    load_checkpoint(tmp_path, resumed, schedule)
    for k, v in adapter_tensors(resumed).items():
        assert torch.equal(v, trained[k]), k
    with torch.no_grad():
        assert torch.equal(resumed(**_inputs())[0], model(**_inputs())[0])

    averaged = ema.lora_tensors()  # the EMA under the file's names, alpha included
    assert set(averaged) == set(trained)
    assert not torch.equal(averaged["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"],
                           trained["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"])
    with pytest.raises(RuntimeError, match="lokr_w2"):
        load_adapter_tensors(resumed, {k: v for k, v in trained.items() if "lokr_w2" not in k})


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantised_base_trains_a_lokr(tiny_sd3, tmp_path, quantize):
    """optimum-quanto's int8 and bitsandbytes' nf4 linears are not plain weights: LyCORIS adds its update to their
    output (its bypass mode, which we use on every base; nf4 on bitsandbytes' CPU back end, in the dev extra)."""
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    cfg = LoraConfig(rank=4, kind="lokr", lycoris={"factor": 2})
    model = quantize_transformer(load_transformer(tiny_sd3), quantize, device="cpu")
    params = add_lora(model, cfg, seed=0)
    loss = lambda: (model(**_inputs())[0] ** 2).mean().item()  # noqa: E731
    before = loss()
    _train(model, params, steps=6)
    assert loss() < 0.97 * before
    assert (tmp_path / LORA_FILE) == export_lora(tmp_path, adapter_tensors(model), cfg)


def test_validation_images_go_through_the_adapter(tiny_sd3, embeds, tmp_path):  # noqa: F811
    cfg = ValidationConfig(prompts=["x"], resolution="64x64", steps=2, guidance=3.0, seed=7)
    vae, sched = load_vae(tiny_sd3), load_sampler(tiny_sd3)
    model = load_transformer(tiny_sd3)
    base = sample_images(model, vae, sched, embeds[:1], embeds[2], cfg, tmp_path / "base", "cpu")
    params = add_lora(model, LoraConfig(rank=4, kind="loha"), seed=0)
    _train(model, params)
    adapted = sample_images(model, vae, sched, embeds[:1], embeds[2], cfg, tmp_path / "loha", "cpu")
    assert base[0].read_bytes() != adapted[0].read_bytes()


@pytest.mark.parametrize("overrides,says", [
    (["lora.lycoris.factor=4"], "lora: lora.lycoris (factor, full_matrix) holds LoKr's settings, and lora.kind is lora"),
    (["lora.kind=loha", "lora.lycoris.full_matrix=true"], "remove lora.lycoris, or set lora.kind: lokr"),
    (["lora.kind=lokx"], "lora.kind"),
    (["lora.kind=lokr", "lora.lycoris.factor=0"], "lora.lycoris.factor: "),
    (["lora.kind=lokr", "lora.lycoris.factor=-3"], "-1 for LyCORIS's balanced split"),
    (["lora.kind=lokr", "lora.lycoris.facter=4"], "lora.lycoris.facter"),
    (["lora.kind=loha", "lora.dropout=0.1"], "have no dropout"),
    (["lora.kind=loha", "train.strategy=zero3"], "lora.kind loha with train.strategy zero3 cannot train: LyCORIS"),
])
def test_bad_lycoris_settings_are_refused_at_the_door(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_job(TINY, overrides)
    assert says in str(err.value)


def test_a_resumed_lokr_run_continues_exactly_through_the_train_loop(tiny_sd3, tmp_path):
    """WorkerRun.train_step (the loop's own step, EMA on) for 4 steps, against 2 + a checkpoint + 2 resumed."""
    from tests.test_ema import job, tiny_run

    cfg = job("lora.kind=lokr", "lora.lycoris.factor=2", "train.ema_decay=0.7", "train.learning_rate=0.05")
    straight = tiny_run(tiny_sd3, cfg)
    for step in range(1, 5):
        straight.train_step(step)
        if step == 2:  # what a checkpoint of step 2 holds (the RNG state too: saved now, as the loop saves it)
            at_2 = straight.strategy.lora_tensors()
            save_checkpoint(tmp_path, at_2, cfg.lora, straight.lr_schedule, 2)
            torch.save(straight.strategy.optimizer.state_dict(), tmp_path / "optimizer.pt")
            straight.ema.save(tmp_path)
    assert set(load_file(str(tmp_path / LORA_FILE))) == set(at_2)  # LyCORIS's names
    resumed = tiny_run(tiny_sd3, cfg, resume_from=tmp_path)
    for step in range(3, 5):
        resumed.train_step(step)
    ours, theirs = straight.strategy.lora_tensors(), resumed.strategy.lora_tensors()
    assert any(not torch.equal(v, at_2[k]) for k, v in ours.items())  # steps 3-4 moved it
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
    for name, ema in straight.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], ema), name


def test_gradient_checkpointing_and_bf16_autocast_give_the_same_lokr_gradients(tiny_sd3):
    from raytune_sd3.models.lora import LoraAutocast

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = load_transformer(tiny_sd3)
        params = add_lora(model, LoraConfig(rank=4, kind="lokr", lycoris={"factor": 2}), seed=0)
        with torch.no_grad():
            for p in params:
                p.add_(0.1)  # off the zero init, so every factor gets a gradient
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        with LoraAutocast(model, "cpu"):
            (model(**_inputs())[0].float() ** 2).mean().backward()
        return [p.grad for p in params]

    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None and g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_the_model_cards_snippet_loads_the_lokr_with_lycoris(tiny_sd3, tmp_path):
    """The Hub card of a lokr run loads it with LyCORIS's loader (load_lora_weights reads no LyCORIS file), and
    the pipeline then gives the trained output."""
    from raytune_sd3.hub.publish import front_matter, model_card
    from tests.test_ema import job

    cfg = job("model.pretrained=tiny-sd3", "lora.kind=lokr", "lora.lycoris.factor=2", f"output_dir={tmp_path}")
    model = load_transformer(tiny_sd3)
    _train(model, add_lora(model, cfg.lora, seed=0))
    export_lora(tmp_path, adapter_tensors(model), cfg.lora)
    text = model_card(cfg, [])
    assert "A LyCORIS LoKr for `tiny-sd3`" in text and "lycoris" in front_matter(text)["tags"]
    code = text.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(tmp_path))
    assert "load_lora_weights" not in code
    lines = [line.split(".to(")[0].replace("torch.bfloat16", "torch.float32") if "from_pretrained" in line
             else line for line in code.splitlines() if not line.startswith("image =")]  # no CUDA here: fp32, exact
    scope: dict = {}
    exec("\n".join(lines), scope)
    with torch.no_grad():
        torch.testing.assert_close(scope["pipe"].transformer(**_inputs())[0], model(**_inputs())[0])


def _ddp_rank(rank: int, port: int, tiny_sd3: str, out: dict) -> None:
    """One of two gloo ranks: the tiny model with a LoKr under DDP as the DDP strategy wraps it (frozen base and
    buffers left alone), one backward on this rank's own inputs; its LoKr gradients after DDP's all-reduce."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raytune_sd3.train.strategy import skip_frozen_sync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = load_transformer(tiny_sd3)
    params = add_lora(model, LoraConfig(rank=4, kind="lokr", lycoris={"factor": 2}), seed=0)
    skipped = skip_frozen_sync(model)
    wrapped = DistributedDataParallel(model)
    (wrapped(**_inputs(seed=rank))[0] ** 2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out[rank] = {"grads": [p.grad.clone() for p in params], "skipped_trainable": sorted(set(skipped) & trainable),
                 "skipped_lycoris": sum(n.startswith("lycoris.") for n in skipped)}
    dist.destroy_process_group()


def test_ddp_all_reduces_the_lokr_gradients(tiny_sd3):
    """Under DDP (two real gloo ranks) every rank holds the mean of the ranks' LoKr gradients: the network is the
    transformer's submodule, so DDP reduces its parameters (and skips only its buffers, equal everywhere)."""
    from tests.conftest import run_gloo_ranks

    out = run_gloo_ranks(_ddp_rank, tiny_sd3)
    alone = []
    for seed in (0, 1):
        model = load_transformer(tiny_sd3)
        params = add_lora(model, LoraConfig(rank=4, kind="lokr", lycoris={"factor": 2}), seed=0)
        (model(**_inputs(seed=seed))[0] ** 2).mean().backward()
        alone.append([p.grad for p in params])
    assert out[0]["skipped_trainable"] == [] and out[0]["skipped_lycoris"] > 0  # its alpha buffers
    for g0, g1, a, b in zip(out[0]["grads"], out[1]["grads"], *alone, strict=True):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, (a + b) / 2, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(*alone, strict=True))  # the ranks' own gradients differ

