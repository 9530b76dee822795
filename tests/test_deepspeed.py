"""DeepSpeed ZeRO-2 / ZeRO-3 in Ray Train on CPU (2 workers over gloo): under bf16 autocast, the same LoRA, loss,
gradient norm and eval loss as DDP, a complete LoRA under ZeRO-3, fp32 LoRA weights beside a base in model.dtype,
and a per-rank optimizer state that resumes exactly."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from raytune_sd3.config import ConfigError, JobConfig, load_job
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.train.strategy import deepspeed_config
from tests.conftest import DEMO_IMAGES

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# Every parameter sharded under ZeRO-3 (DeepSpeed keeps tensors under 1e5 elements whole by default, which would be
# all of the tiny model's): the saved LoRA must then be gathered from the shards. Also exercises a user's JSON.
ZERO3_JSON = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# DeepSpeed's ZeRO-3 linear (memory_efficient_linear, its default) adds the bias after the bf16 matmul, where torch's
# linear rounds once: under bf16 autocast that moves the loss by ~1e-4 and the gradients by ~1e-3 on the tiny model.
# The comparison with DDP runs torch's; the round trip keeps DeepSpeed's.
ZERO3_AS_TORCH_JSON = {"zero_optimization": {**ZERO3_JSON["zero_optimization"], "memory_efficient_linear": False}}
# Then ZeRO-3's forward equals DDP's, but not its backward: its hooks on every module's inputs change the order in
# which autograd sums the bf16 gradients of tensors that several modules use, which moves the first block's LoRA
# gradients by ~1e-3 (relative) here, the last block's not at all. ZeRO-2 equals DDP to float rounding.
ZERO3_BF16_REL = 2e-3


def _job(tmp: Path, *overrides: str) -> JobConfig:
    """The demo job with its `auto` settings resolved as on this CPU machine (2 workers, fp32)."""
    from raytune_sd3.driver.placement import Cluster, resolve_auto

    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [
        f"output_dir={tmp / 'out'}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}", *overrides])
    resolve_auto(cfg, Cluster(({"CPU": 4.0},)))
    return cfg


# --- the generated config (no Ray) ---------------------------------------------------------------------------------


def test_generated_config(tmp_path):
    cfg = _job(tmp_path, "train.strategy=zero3", "train.batch_size=3", "train.grad_accum=2",
               "train.max_grad_norm=0.5", "train.mixed_precision=bf16")
    ds = deepspeed_config(cfg, world=2)
    assert ds["zero_optimization"] == {"stage": 3}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    assert ds["gradient_clipping"] == 0.5
    # bf16 is autocast around the forward, as under DDP: no DeepSpeed bf16 (which casts the module, LoRA included),
    # and no module whose gradients DeepSpeed would reduce in bf16.
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["steps_per_print"] > 10**9 and ds["wall_clock_breakdown"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: a torch optimizer, our LR schedule
    fp32 = deepspeed_config(_job(tmp_path, "train.strategy=zero2", "train.max_grad_norm=null"), 1)
    assert fp32["gradient_clipping"] == 0.0 and "torch_autocast" not in fp32


def test_user_json_keeps_its_keys_but_not_our_batch_and_clipping(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 8,
                                "gradient_clipping": 9.0, "zero_optimization": {"stage": 2, "overlap_comm": True},
                                "bf16": {"enabled": False}}))
    ds = deepspeed_config(_job(tmp_path, "train.strategy=zero2", f"train.deepspeed_config={path}"), world=2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["bf16"] == {"enabled": False}
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        4, 1, 1.0)


@pytest.mark.parametrize("overrides,ds,message", [
    (["train.grad_clip=value"], {}, "grad_clip 'value' works with train.strategy ddp only"),
    (["train.deepspeed_config={json}"], {"zero_optimization": {"stage": 2}},
     "sets zero_optimization.stage 2 but train.strategy is zero3"),
    (["train.deepspeed_config={json}", "train.mixed_precision=bf16"], {"bf16": {"enabled": True}},
     "enables bf16; remove it: mixed precision comes from train.mixed_precision"),
    (["train.deepspeed_config={json}"], {"fp16": {"enabled": "auto"}, "torch_autocast": {"enabled": True}},
     "enables fp16 and torch_autocast; remove it"),
])
def test_config_errors_say_what_to_do(tmp_path, overrides, ds, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    # Caught when the job is read (a typed-config rule) or when its paths are checked (check_paths builds the
    # DeepSpeed config): either way in the driver, before any worker starts.
    with pytest.raises(ConfigError, match=message):
        cfg = _job(tmp_path, "train.strategy=zero3", *(o.format(json=path) for o in overrides))
        check_paths(cfg)


# --- the real loop: DDP, ZeRO-2, ZeRO-3 on the same data -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, demo_cache) -> dict[str, Path]:
    """The demo job for 4 steps (2 micro-steps each, cosine LR) under bf16 autocast, with an eval loss at steps 0
    and 4, under each strategy: {strategy: output_dir}. 2 eval items x 5 sigmas in forwards of 2 pairs: 3 on one
    rank, 2 and one left out of the sum on the other (under ZeRO-3 each forward is a collective)."""
    from raytune_sd3.driver.caching import prepare_data
    from raytune_sd3.driver.training import build_trainer
    from raytune_sd3.testmodels.resolve import resolve_pretrained
    from raytune_sd3.train.checkpoint import copy_final_lora

    tmp = tmp_path_factory.mktemp("deepspeed")
    (tmp / "zero3.json").write_text(json.dumps(ZERO3_AS_TORCH_JSON))
    outs, manifest = {}, None
    for strategy in ("ddp", "zero2", "zero3"):
        cfg = load_job(ROOT / "jobs" / "tiny.yaml", [
            f"output_dir={tmp / strategy}", f"data.cache_dir={demo_cache}",
            f"data.datasets.0.instance_data_dir={tmp / 'demo'}", f"data.datasets.0.demo_images={DEMO_IMAGES}",
            "data.eval_samples=2", "data.caption_dropout=0", "validation.prompts=[]", f"train.max_steps={STEPS}",
            "train.lr_warmup_steps=1", "train.batch_size=2", "train.grad_accum=2", f"train.strategy={strategy}",
            "train.mixed_precision=bf16",
            *([f"train.deepspeed_config={tmp / 'zero3.json'}"] if strategy == "zero3" else [])])
        pretrained = resolve_pretrained(cfg.model.pretrained)
        if manifest is None:
            manifest, _ = prepare_data(cfg, pretrained)
        result = build_trainer(cfg, manifest, pretrained).fit()
        assert result.error is None, f"{strategy}: {result.error}"
        with result.checkpoint.as_directory() as folder:
            copy_final_lora(folder, cfg.output_dir)
            (Path(cfg.output_dir) / "optimizer_files.json").write_text(json.dumps(sorted(
                p.name for p in Path(folder).glob("optimizer_rank*.pt"))))
            for p in Path(folder).glob("optimizer_rank*.pt"):
                torch.load(p, weights_only=True)  # no pickled objects in a checkpoint
        outs[strategy] = Path(cfg.output_dir)
    return outs


def _lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def _records(out: Path) -> list[dict]:
    return list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


def _steps(out: Path) -> list[dict]:
    return [r for r in _records(out) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_saves_the_lora_ddp_saves(trained, strategy):
    ddp, zero = _lora(trained["ddp"]), _lora(trained[strategy])
    assert set(zero) == set(ddp) and len(ddp) > 0
    for k in ddp:
        assert zero[k].shape == ddp[k].shape, k
        if strategy == "zero2":
            torch.testing.assert_close(zero[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
        else:
            assert (zero[k] - ddp[k]).norm() <= ZERO3_BF16_REL * ddp[k].norm(), k
    assert any(".lora_B." in k and zero[k].abs().max() > 1e-4 for k in zero)  # trained, not the zero init


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_loss_and_grad_norm_equal_ddp(trained, strategy):
    ddp, zero = _steps(trained["ddp"]), _steps(trained[strategy])
    assert [r["step"] for r in zero] == [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, zero, strict=True):
        assert b["lr"] == a["lr"] and b["nonfinite_steps"] == 0
        assert math.isclose(b["loss"], a["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(b["grad_norm"], a["grad_norm"], rel_tol=1e-4 if strategy == "zero2" else 1e-3), (a, b)
    assert len({r["lr"] for r in ddp}) > 2  # the LR schedule (ours, outside DeepSpeed) moved
    evals = [{r["step"]: r["eval_loss"] for r in _records(trained[s]) if "eval_loss" in r} for s in ("ddp", strategy)]
    assert set(evals[0]) == set(evals[1]) == {0, STEPS}
    assert math.isclose(evals[1][0], evals[0][0], rel_tol=1e-6)  # the same weights, the same forwards
    assert math.isclose(evals[1][STEPS], evals[0][STEPS], rel_tol=1e-4)
    files = json.loads((trained[strategy] / "optimizer_files.json").read_text())
    assert files == ["optimizer_rank0.pt", "optimizer_rank1.pt"]
    assert json.loads((trained["ddp"] / "optimizer_files.json").read_text()) == ["optimizer_rank0.pt"]


# --- the strategy alone: optimizer state round trip, non-finite steps ---------------------------------------------


def _inputs(step: int, micro: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "timestep": torch.tensor([300.0, 800.0]),
            "encoder_hidden_states": torch.randn(2, 154, 96, generator=g),
            "pooled_projections": torch.randn(2, 80, generator=g), "return_dict": False}


def _train_step(strategy, step: int, rank: int, grad_accum: int, nan_on_rank: int | None = None):
    for micro in range(grad_accum):
        with strategy.accumulating(sync=micro == grad_accum - 1):
            loss = strategy.wrapped(**_inputs(step, micro, rank))[0].pow(2).mean() / grad_accum
            if rank == nan_on_rank:
                loss = loss * math.inf
            strategy.backward(loss)
    return tuple(strategy.step(loss.detach()))[1:]  # (grad norm, stepped): a plain tuple for torch.load


def _round_trip_worker(config: dict) -> None:
    """Per stage: train 2 steps, save each rank's optimizer state, take step 3; a fresh model + engine loads the state
    (and nothing else) and takes step 3 too. Then a step with an inf loss on one rank. Rank 0 writes what it saw,
    and the dtypes of the (partitioned under ZeRO-3) LoRA and base parameters after DeepSpeed wrapped them."""
    import deepspeed.comm
    import ray.train

    from raytune_sd3.models.loading import DTYPES, load_transformer
    from raytune_sd3.models.lora import add_lora
    from raytune_sd3.train.optim import make_optimizer
    from raytune_sd3.train.strategy import make_strategy

    ctx = ray.train.get_context()
    rank, world, folder = ctx.get_world_rank(), ctx.get_world_size(), Path(config["dir"])
    results = {}
    for name, job in config["jobs"].items():
        cfg = JobConfig.model_validate(job)

        def fresh(cfg=cfg):
            transformer = load_transformer(config["pretrained"], DTYPES[cfg.model.dtype])
            params = add_lora(transformer, cfg.lora, seed=cfg.train.seed + 1)  # other init: the load must fix it
            return make_strategy(transformer, params, make_optimizer(params, cfg.train), cfg, world)

        ga = cfg.train.grad_accum
        a = fresh()
        dtypes = {"lora" if p.requires_grad else "base": str(p.dtype) for p in a.transformer.parameters()}
        for step in (1, 2):
            _train_step(a, step, rank, ga)
        path = folder / f"{name}_optimizer_rank{rank}.pt"
        torch.save(a.optimizer_state(), path)
        saved = a.lora_tensors()
        continued = _train_step(a, 3, rank, ga), a.lora_tensors()

        b = fresh()
        b.load_optimizer_state(torch.load(path, weights_only=True))
        loaded = b.lora_tensors()
        resumed = _train_step(b, 3, rank, ga), b.lora_tensors()

        skipped = _train_step(b, 4, rank, ga, nan_on_rank=1), b.lora_tensors()
        after = _train_step(b, 5, rank, ga), b.lora_tensors()
        results[name] = {"saved": saved, "loaded": loaded, "continued": continued, "resumed": resumed,
                         "skipped": skipped, "after": after, "dtypes": dtypes,
                         "shm_op": deepspeed.comm.comm.cdb.shm_comm_op is not None}
    if rank == 0:
        torch.save(results, folder / "results.pt")


@pytest.fixture(scope="module")
def round_trip(ray_local, tiny_sd3, tmp_path_factory) -> dict:
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tmp = tmp_path_factory.mktemp("deepspeed_round_trip")
    (tmp / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    jobs = {}
    # ZeRO-2 in fp32, training a LyCORIS LoKr (its factors reach the engine as the LoRA's do), and a DoRA (its
    # magnitudes too); ZeRO-3 as it shards a large base: bf16 base, bf16 autocast (the forward gets fp32 inputs).
    for name, extra in (("zero2", ["lora.kind=lokr", "lora.lycoris.factor=2"]), ("zero2-dora", ["lora.kind=dora"]),
                        ("zero3", [f"train.deepspeed_config={tmp / 'zero3.json'}", "model.dtype=bf16",
                                   "train.mixed_precision=bf16"])):
        cfg = _job(tmp, f"train.strategy={name.split('-')[0]}", "train.batch_size=2", "train.grad_accum=2", *extra)
        jobs[name] = cfg.model_dump(mode="json")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    trainer = TorchTrainer(_round_trip_worker, torch_config=TorchConfig(backend="gloo"),
                           train_loop_config={"dir": str(tmp), "jobs": jobs, "pretrained": tiny_sd3},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=ray.train.RunConfig(storage_path=str(tmp / "ray")))
    result = trainer.fit()
    assert result.error is None, result.error
    return torch.load(tmp / "results.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero2-dora", "zero3"])
def test_optimizer_state_round_trip_resumes_exactly(round_trip, strategy):
    r = round_trip[strategy]
    assert any(".lokr_w1" in k for k in r["saved"]) == (strategy == "zero2")  # ZeRO-2's first run trains a LoKr
    assert any("magnitude" in k for k in r["saved"]) == (strategy == "zero2-dora")  # its second a DoRA
    for k, v in r["saved"].items():
        torch.testing.assert_close(r["loaded"][k], v, rtol=0, atol=0)  # the state alone restores the weights
    (norm_a, stepped_a), lora_a = r["continued"]
    (norm_b, stepped_b), lora_b = r["resumed"]
    assert stepped_a and stepped_b and norm_a > 0
    assert math.isclose(norm_b, norm_a, rel_tol=1e-6)
    for k, v in lora_a.items():  # Adam's moments came back too, else step 3 would differ
        torch.testing.assert_close(lora_b[k], v, rtol=1e-6, atol=1e-8, msg=k)
    assert any(not torch.equal(v, r["saved"][k]) for k, v in lora_a.items())  # step 3 moved the weights
    # DeepSpeed's backend on the CPU built no shared-memory op (a compile of 28 s on a new machine) and trained
    assert not r["shm_op"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,base", [("zero2", "torch.float32"), ("zero3", "torch.bfloat16")])
def test_lora_stays_fp32_and_the_base_keeps_model_dtype(round_trip, strategy, base):
    assert round_trip[strategy]["dtypes"] == {"lora": "torch.float32", "base": base}
    assert all(v.dtype == torch.float32 for v in round_trip[strategy]["after"][1].values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_non_finite_loss_on_one_rank_skips_the_step_everywhere(round_trip, strategy):
    r = round_trip[strategy]
    (norm, stepped), lora = r["skipped"]
    assert not stepped and math.isinf(norm)
    for k, v in r["resumed"][1].items():
        torch.testing.assert_close(lora[k], v, rtol=0, atol=0)  # untouched
    (norm, stepped), lora = r["after"]
    assert stepped and math.isfinite(norm)
    assert all(torch.isfinite(v).all() for v in lora.values())
