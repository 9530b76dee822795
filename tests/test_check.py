"""The preflight (python -m raytune_sd3.check) and the memory estimator behind it.

Parameter and LoRA counts are compared with diffusers' own model (built on the meta device, so SD3.5 Large costs
nothing); the activation formula with the exact allocation trace of a training step (meta device, flash
attention) at real widths; the whole estimate with the measured peak of a real CPU step of the tiny model.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from raytune_sd3.check import main as check_main
from raytune_sd3.config import TINY_MODELS, LoraConfig, load_job
from raytune_sd3.memory import (
    GIB,
    activation_bytes,
    autocast_weight_copies,
    estimate,
    lora_params,
    transformer_buffers,
    transformer_params,
)
from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS, SD3_VAE_PARAMS, TransformerShape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the tracer that checks the estimate lives beside the benchmarks
from tracer import cuda_autocast_policy, trace_peak, two_blocks  # noqa: E402

LARGE, MEDIUM35, MEDIUM3 = ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
                            "stabilityai/stable-diffusion-3-medium-diffusers")


@pytest.fixture(scope="module")
def tiny_configs(tiny_sd3) -> dict[str, dict]:
    from raytune_sd3.testmodels.tiny import ensure_tiny_pipeline

    return {name: json.loads((ensure_tiny_pipeline(name) / "transformer" / "config.json").read_text())
            for name in ("tiny-sd3", "tiny-sd35")}


def _meta_model(config: dict):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(config)


@pytest.mark.parametrize("name", [LARGE, MEDIUM35, MEDIUM3, "tiny-sd3", "tiny-sd35"])
def test_parameter_counts_match_diffusers(name, tiny_configs):
    from raytune_sd3.models.lora import add_lora

    config = tiny_configs.get(name) or KNOWN_TRANSFORMERS[name]
    shape = TransformerShape.from_config(config)
    model = _meta_model(config)
    assert transformer_params(shape) == sum(p.numel() for p in model.parameters())
    assert transformer_buffers(shape) == sum(b.numel() for b in model.buffers())
    for targets, kind in (("attention", "lora"), ("attention+context", "lora"), ("all", "lora"), ("all", "dora")):
        model = _meta_model(config)
        params = add_lora(model, LoraConfig(rank=16, targets=targets, kind=kind))
        assert lora_params(shape, targets, 16, kind=kind) == sum(p.numel() for p in params), targets
    lycoris = (("lokr", None), ("lokr", {"factor": 8}), ("lokr", {"factor": 16, "full_matrix": True}), ("loha", None))
    for kind, lokr in lycoris if name == "tiny-sd35" else ():  # the library counts; this checks the layers match
        model = _meta_model(config)
        params = add_lora(model, LoraConfig(rank=4, targets="attention+context", kind=kind, lycoris=lokr))
        assert lora_params(shape, "attention+context", 4, kind=kind, **(lokr or {})) == sum(p.numel() for p in params)


def test_published_sizes():
    """SD3.5 Large is the 8.1B model, SD3.5 Medium 2.5B (with its ~0.2B position table), SD3 Medium 2B."""
    assert round(transformer_params(TransformerShape.from_config(KNOWN_TRANSFORMERS[LARGE])) / 1e9, 1) == 8.1
    assert round(transformer_params(TransformerShape.from_config(KNOWN_TRANSFORMERS[MEDIUM35])) / 1e9, 1) == 2.2
    assert round(transformer_params(TransformerShape.from_config(KNOWN_TRANSFORMERS[MEDIUM3])) / 1e9, 1) == 2.0


def test_vae_constant_matches_the_sd3_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    assert sum(p.numel() for p in vae.parameters()) == SD3_VAE_PARAMS


def test_meta_trace_equals_a_real_cpu_step(tiny_configs):
    """The meta-device trace allocates exactly what a real step allocates (so it stands in for real-size runs)."""
    kw = dict(dtype="fp32", targets="attention", rank=8, batch=4, resolution=64, t5_tokens=77)
    assert trace_peak(tiny_configs["tiny-sd3"], device="meta", **kw) == trace_peak(tiny_configs["tiny-sd3"],
                                                                                  device="cpu", **kw)


@pytest.mark.parametrize("name,targets,dtype", [(LARGE, "attention", "bf16"), (LARGE, "all", "fp32"),
                                                (MEDIUM35, "attention+context", "bf16"), (MEDIUM3, "all", "bf16")])
def test_activation_formula_at_real_width(name, targets, dtype):
    """Real widths and heads, 2 blocks (one dual for SD3.5 Medium), 512px, T5 154: within 5% (a 2-block slice is
    half last-block; full 38-block SD3.5 Large is within 1%, benchmarks/RESULTS.md)."""
    config = two_blocks(name)
    traced = trace_peak(config, dtype=dtype, targets=targets, rank=16, batch=1, resolution=512, t5_tokens=154)
    measured = traced["forward"] - traced["static"]
    est = activation_bytes(TransformerShape.from_config(config), targets, {"bf16": 2, "fp32": 4}[dtype], 1, 512, 154)
    assert abs(est / measured - 1) < 0.05, (est, measured)


@pytest.mark.parametrize("name,targets,dtype", [(LARGE, "attention", "bf16"), (MEDIUM35, "all", "bf16"),
                                                (MEDIUM3, "attention+context", "fp32")])
def test_activation_formula_under_bf16_autocast(name, targets, dtype):
    """The GPU default: bf16 autocast with peft's casts off (LoraAutocast), traced as a real CPU step given CUDA's
    autocast policy, at real widths (2 blocks, 512px, T5 154): activations, plus on an fp32 base the bf16 weight
    copies autocast keeps for backward, within 5%. The formula without autocast counts +9..+24% too much on a
    bf16 base (fp32 LoRA-input copies) and misses the weight copies (-40..-60%) on an fp32 one."""
    config = two_blocks(name)
    traced = trace_peak(config, dtype=dtype, targets=targets, rank=16, batch=1, resolution=512, t5_tokens=154,
                        device="cpu", mixed_precision="bf16")
    measured = traced["forward"] - traced["static"]
    shape = TransformerShape.from_config(config)
    est = activation_bytes(shape, targets, 2, 1, 512, 154, autocast=True)
    if dtype == "fp32":
        est += autocast_weight_copies(shape)
    assert abs(est / measured - 1) < 0.05, (est, measured)


@pytest.mark.parametrize("name,targets,quantization,mixed_precision", [(LARGE, "attention", "int8", "bf16"),
                                                                       (MEDIUM3, "all", "int2", "no")])
def test_estimate_of_a_quantised_base_against_its_traced_step(name, targets, quantization, mixed_precision):
    """A quanto base (2 blocks at real width, a real CPU step): its weights at their quantised size, activations as
    the unquantised base's (our quanto linears keep no input), int2's dequantised weight in flight; within 5%."""
    kw = dict(dtype="bf16", targets=targets, rank=16, batch=1, resolution=512, t5_tokens=154,
              mixed_precision=mixed_precision, quantization=quantization)
    config = two_blocks(name)
    measured = trace_peak(config, device="cpu", **kw)["peak"]
    est = estimate(TransformerShape.from_config(config), vae_params=None, runtime=False, **kw).total
    assert abs(est / measured - 1) < 0.05, (est, measured)


def test_estimate_of_an_fp32_base_under_bf16_autocast_against_its_traced_step(tiny_configs):
    """The whole estimate of an fp32 base under bf16 autocast (a CPU-default dtype with the GPU-default precision)
    against a real CPU step of the tiny model given CUDA's autocast policy: within 3%. The bf16 weight copies
    autocast keeps for backward are over 3% of this step, so an estimate without them is off by more than that."""
    config = tiny_configs["tiny-sd3"]
    kw = dict(dtype="fp32", targets="all", rank=8, batch=1, resolution=64, t5_tokens=77, mixed_precision="bf16")
    measured = trace_peak(config, device="cpu", **kw)["peak"]
    shape = TransformerShape.from_config(config)
    est = estimate(shape, vae_params=None, runtime=False, **kw).total
    assert abs(est / measured - 1) < 0.03, (est, measured)
    assert autocast_weight_copies(shape) > 0.035 * measured


def test_cuda_autocast_policy_on_cpu():
    """Inside the tracer's policy, CPU autocast runs layer_norm, pow and sum in fp32 as CUDA's does (plain CPU
    autocast keeps them bf16), matmuls stay bf16, and leaving it restores CPU's own policy."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16
        with cuda_autocast_policy():
            assert [t.dtype for t in (torch.nn.functional.layer_norm(x, (8,)), x**2, x.sum(), x.sum(1))] == [
                torch.float32] * 4
            assert torch.nn.functional.linear(x.float(), x.float()).dtype == torch.bfloat16
            assert torch.softmax(x, 1, dtype=torch.bfloat16).dtype == torch.bfloat16  # a dtype given is kept
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_estimate_against_the_measured_tiny_step(tiny_configs):
    """The whole estimate (no GPU runtime margin, no VAE) against a real CPU training step's peak: within 10%."""
    config = tiny_configs["tiny-sd3"]
    kw = dict(dtype="fp32", targets="all", rank=8, batch=4, resolution=64, t5_tokens=77)
    measured = trace_peak(config, device="cpu", **kw)["peak"]
    est = estimate(TransformerShape.from_config(config), vae_params=None, runtime=False, **kw).total
    assert abs(est / measured - 1) < 0.10, (est, measured)


def test_sharding_and_quantisation_lower_the_estimate():
    shape = TransformerShape.from_config(KNOWN_TRANSFORMERS[LARGE])
    kw = dict(dtype="bf16", targets="all", rank=64, batch=1, resolution=1024, t5_tokens=154, num_workers=8)
    ddp, z2, z3 = (estimate(shape, strategy=s, **kw).total for s in ("ddp", "zero2", "zero3"))
    assert ddp > z2 > z3
    assert ddp - z3 > 12 * GIB  # ZeRO-3 shards the 15 GiB of bf16 weights over 8 GPUs
    int8 = estimate(shape, quantization="int8", **kw).total
    # The linears models/quantize.py quantises (attention and feed-forward; the AdaLN modulation linears match
    # "*norm*" and stay bf16), counted on diffusers' own model: 1 byte each instead of 2.
    from raytune_sd3.models.quantize import quantised_linear

    model = _meta_model(KNOWN_TRANSFORMERS[LARGE])
    quantised = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and quantised_linear(n))
    assert 5.0e9 < quantised < 5.6e9
    assert ddp - int8 == pytest.approx(quantised, rel=1e-6)
    nf4 = estimate(shape, quantization="nf4", **kw).total
    dequantised = 4 * 2432 * 2432 * 2  # the widest linear (feed-forward, 4x width) in bf16, one at a time
    assert ddp - nf4 == pytest.approx(quantised * (2 - (0.5 + 1 / 64 + 4 / (64 * 256))) - dequantised, rel=1e-6)
    with pytest.raises(ValueError, match="strategy"):
        estimate(shape, strategy="fsdp", **kw)


def test_the_ema_costs_one_fp32_copy_of_the_lora_on_every_worker(capsys):
    from raytune_sd3.memory import lora_params

    shape = TransformerShape.from_config(KNOWN_TRANSFORMERS[LARGE])
    kw = dict(dtype="bf16", targets="all", rank=64, batch=1, resolution=1024, t5_tokens=154, num_workers=8)
    for strategy in ("ddp", "zero2"):  # not sharded under ZeRO-2 either: each worker updates the whole EMA
        plain, with_ema = (estimate(shape, strategy=strategy, ema=ema, **kw).total for ema in (False, True))
        assert with_ema - plain == 4 * lora_params(shape, "all", 64)
    check_main(["jobs/sd35.yaml", "--skip-paths", "--set", "train.ema_decay=0.999"])
    assert "EMA of the LoRA (fp32, whole on every worker)" in capsys.readouterr().out
    # validation.use_ema: while the EMA samples, the trained LoRA is kept aside, between steps as the VAE decode is:
    # one more copy where validation sets the peak (an 8192 px decode), none where training does (1024 px)
    for val_res, extra in ((8192, 4 * lora_params(shape, "all", 64)), (1024, 0)):
        plain, sampling = (estimate(shape, ema=True, ema_sampling=s, validation_resolution=val_res, **kw).total
                           for s in (False, True))
        assert sampling - plain == extra, val_res


def test_scheduled_sampling_costs_no_memory_and_is_never_told_to_use_zero3():
    """Its rollout forwards keep no activations (memory.py): the same estimate, a line saying what it costs, and no
    fix that the door would refuse (ZeRO-3 with scheduled sampling)."""
    from raytune_sd3.driver.checks import Report, check_memory

    fixes = {}
    for rollout in ([], ["flow.scheduled_sampling.max_step_offset=5"]):
        cfg = load_job(ROOT / "jobs" / "sd35.yaml", ["train.num_workers=8", "train.gradient_checkpointing=true",
                                                      "train.batch_size=1", "train.grad_accum=1", *rollout])
        report = Report()
        check_memory(cfg, report, 16 * 2**30, "a 16 GB card", "ddp", None, None)
        fixes[bool(rollout)] = [line for line in report.lines if line.startswith("[FAIL] memory")]
        assert any(line.startswith("[ok]   rollout  flow.scheduled_sampling: up to 5 extra forward passes")
                   for line in report.lines) is bool(rollout)
    plain, rolled = fixes[False][0], fixes[True][0]
    assert "--set train.strategy=zero3" in plain and "zero3" not in rolled
    assert plain.split(". Change")[0] == rolled.split(". Change")[0]  # the same GiB: no extra memory
    # the door's own rules decide (driver/checks._door_allows): an EMA or a DoRA is refused under ZeRO-3 too
    for refused in ("train.ema_decay=0.999", "lora.kind=dora"):
        cfg = load_job(ROOT / "jobs" / "sd35.yaml", ["train.num_workers=8", "train.gradient_checkpointing=true",
                                                      "train.batch_size=1", "train.grad_accum=1", refused])
        report = Report()
        check_memory(cfg, report, 16 * 2**30, "a 16 GB card", "ddp", None, None)
        (line,) = [line for line in report.lines if line.startswith("[FAIL] memory")]
        assert "Change one of" in line and "zero3" not in line, (refused, line)


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_tiny_job_fits(tiny_sd3, tmp_path, capsys):
    rc = check_main(["jobs/tiny.yaml", "--gpu", "L4-24GB", "--set", f"output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fits:" in out and "all checks passed" in out
    assert re.search(r"shapes: (demo, 48 square images generated on first use, 1 bucket 64x64|48 images in .*, "
                     r"1 bucket\(s\): 64x64 \(48\))", out), out


def test_sd35_does_not_fit_a_40gb_a100(capsys):
    rc = check_main(["jobs/sd35.yaml", "--cluster", "cluster/aws-a100.yaml", "--skip-paths"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "p4d.24xlarge" in out and "does not fit" in out and "SD3.5" not in out.split("does not fit")[0][-5:]


def test_a_job_that_does_not_fit_is_told_what_to_change_and_the_change_fits(capsys):
    """SD3.5 Large at batch 4 in one pass (81.7 GiB measured on an H200) is over an 80 GB H100: the check offers the
    same images per step in smaller micro-batches, and only splits that keep that number (4 = 2 x 2, not 3 x 2)."""
    h100 = ["jobs/sd35.yaml", "--cluster", "cluster/aws-h100.yaml", "--skip-paths"]
    assert check_main([*h100, "--set", "train.batch_size=4", "--set", "train.grad_accum=1"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "--set train.batch_size=2 --set train.grad_accum=2" in out
    assert check_main([*h100, "--set", "train.batch_size=2", "--set", "train.grad_accum=2"]) == 0
    assert "fits:" in capsys.readouterr().out
    assert check_main([*h100, "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                       "--set", "model.quantize=int8"]) == 1
    out = capsys.readouterr().out
    assert "--set train.batch_size=2 --set train.grad_accum=2 (same" in out and "batch_size=3" not in out


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    """(job, --set overrides) of every `python -m raytune_sd3.{train,tune,check} JOB ...` that a cluster file runs
    (a RayJob's entrypoint) or tells its reader to run (its header, `\\` continuations joined)."""
    text = re.sub(r"\\\n#?\s*", " ", path.read_text())
    found = []
    for m in re.finditer(r"python -m raytune_sd3\.(?:train|tune|check) ([^\n#&`]+)", text):
        args = shlex.split(m.group(1))
        found.append((args[0], [args[i + 1] for i, a in enumerate(args) if a == "--set"]))
    return found


def _gpu_cluster_files() -> list[Path]:
    return [p for p in sorted((ROOT / "cluster").glob("*.yaml")) if any(
        isinstance(d, dict) and ("available_node_types" in d or d.get("kind") in ("RayCluster", "RayJob"))
        for d in yaml.safe_load_all(p.read_text()))]


# Cluster jobs name their worker count; one-machine jobs (num_workers auto, no shared mount) are sized by the machine
# they run on and checked against it below.
GPU_JOBS = [p for p in sorted((ROOT / "jobs").glob("*.yaml")) if load_job(p).model.pretrained not in TINY_MODELS
            and load_job(p).train.num_workers != "auto"]
MACHINE_JOBS = {"sd35-24gb.yaml": ("L4-24GB", 1), "sd35-80gb.yaml": ("H100-80GB", 1), "sd35-8gpu.yaml": ("H100", 8)}
GPU_CLUSTERS = _gpu_cluster_files()


def _fits(job: str, cluster: Path, sets: list[str], capsys) -> None:
    rc = check_main([job, "--cluster", str(cluster), "--skip-paths", *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    assert rc == 0 and "[ok]   memory   fits:" in out, out + err  # not "fits, but tight": that may run out of memory


@pytest.mark.parametrize("job,cluster", [(j, c) for j in GPU_JOBS for c in GPU_CLUSTERS],
                         ids=lambda p: p.name)
def test_every_shipped_gpu_job_fits_every_shipped_gpu_cluster(job, cluster, capsys):
    """Shipped jobs and clusters must not drift apart again: each GPU job fits each GPU cluster file, with only the
    --set overrides that cluster file's own commands give (40 GB A100s: gradient checkpointing)."""
    sets = sorted({s for _, sets in _commands(cluster) for s in sets})
    _fits(str(job), cluster, sets, capsys)


@pytest.mark.parametrize("cluster", GPU_CLUSTERS, ids=lambda p: p.name)
def test_what_a_cluster_file_runs_fits_it(cluster, capsys):
    """Each command a cluster file runs or prints (ray job submit, the RayJob entrypoint, the preflight) fits."""
    commands = _commands(cluster)
    assert commands, f"{cluster.name} names no job to run"
    for job, sets in commands:
        _fits(job, cluster, sets, capsys)


def test_the_gpu_matrix_is_what_ships():
    assert {p.name for p in GPU_JOBS} == {"sd35.yaml", "tune-sd35.yaml", "sd35-lowvram.yaml"}
    assert {p.name for p in GPU_CLUSTERS} == {"aws-h100.yaml", "aws-a100.yaml", "gcp-h100.yaml", "gcp-a100.yaml",
                                              "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"}


def test_kuberay_files_give_the_gpu(capsys):
    for f in ("cluster/kuberay-raycluster.yaml", "cluster/kuberay-rayjob.yaml"):
        check_main(["jobs/sd35.yaml", "--cluster", f, "--skip-paths"])
        out = capsys.readouterr().out
        assert "3 workers on 3 x nvidia-h100-80gb (1x H100-80GB)" in out, out


def test_counts_images_and_reports_unreachable_paths(tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(data / f"{i}.png")
    (data / "0.txt").write_text("a red square")
    job = tmp_path / "job.yaml"
    job.write_text(f"""output_dir: {tmp_path / 'out'}
model: {{pretrained: tiny-sd3}}
data:
  datasets: [{{id: photos, instance_data_dir: {data}, resolution: 512}}]
  eval_samples: 1
train: {{num_workers: 1, batch_size: 2}}
""")
    assert check_main([str(job), "--gpu", "A10G-24GB"]) == 0
    out = capsys.readouterr().out
    assert "photos: 3 images, 1 with a .txt caption, 1 bucket(s): 512x512 (3)" in out

    Image.new("RGB", (64, 32)).save(data / "wide.png")  # 2:1 at 512 px of area: a bucket of one image
    assert check_main([str(job), "--gpu", "A10G-24GB"]) == 1
    out = capsys.readouterr().out
    assert "2 bucket(s): 512x512 (3), 704x384 (1)" in out
    assert "bucket 704x384 (data set photos): 1 samples per epoch" in out and "data.small_buckets" in out
    assert check_main([str(job), "--gpu", "A10G-24GB", "--set", "data.small_buckets=drop"]) == 0

    assert check_main([str(job), "--set", f"data.datasets=[{{id: gone, instance_data_dir: {tmp_path / 'nope'}}}]"]) == 1
    out = capsys.readouterr().out
    assert "not reachable from here" in out and "problem(s) to fix" in out

    assert check_main([str(job), "--set", "train.batch_size=4", "--set", "train.num_workers=2",
                       "--set", "data.small_buckets=drop"]) == 1
    assert "2 of 2 aspect bucket(s) cannot fill one global batch of 8" in capsys.readouterr().out


def test_bad_config_exits_2(tmp_path, capsys):
    assert check_main(["jobs/tiny.yaml", "--set", "train.batch_sise=2"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err


def test_cli_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.check", "jobs/sd35.yaml", "--gpu", "H200-141GB",
                        "--skip-paths", "--set", "train.num_workers=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fits:" in r.stdout and "38 blocks x width 2432" in r.stdout


def test_sd35_job_paths_unchanged():
    """The cluster files mount shared storage where the job expects it (a guard for both sides)."""
    cfg = load_job(ROOT / "jobs" / "sd35.yaml")
    assert str(cfg.output_dir).startswith("/mnt/shared/")


def test_job_keys_drive_the_estimate(capsys):
    """train.strategy, model.quantize and train.gradient_checkpointing from the job change the estimate, and the
    suggested fix for a 40 GB A100 is a key that makes it fit."""
    base = ["jobs/sd35.yaml", "--gpu", "A100-40GB", "--skip-paths", "--set", "train.num_workers=1"]  # one card
    assert check_main(base) == 1
    out = capsys.readouterr().out
    assert "--set train.gradient_checkpointing=true" in out
    assert check_main([*base, "--set", "train.gradient_checkpointing=true"]) == 0
    assert "activations, checkpointed" in capsys.readouterr().out

    def total(*sets: str) -> float:
        check_main(["jobs/sd35.yaml", "--skip-paths", *[a for s in sets for a in ("--set", s)]])
        line = next(x for x in capsys.readouterr().out.splitlines() if "total per GPU" in x)
        return float(line.split()[-2])

    plain = total()
    assert total("train.strategy=zero3") < plain
    assert total("model.quantize=int8") < plain - 4.9  # GiB: 5.3B linear weights at 1 byte instead of 2
    # A what-if the trainer refuses (quanto under DeepSpeed) is estimated and said to be refused.
    check_main(["jobs/sd35.yaml", "--skip-paths", "--strategy", "zero2", "--quantization", "int8"])
    assert "[warn] memory   estimated, but the trainer refuses it: model.quantize int8 with train.strategy zero2" in (
        capsys.readouterr().out)


def test_the_lowvram_job_fits_a_12gb_card_and_not_a_10gb_one(capsys):
    """jobs/sd35-lowvram.yaml (SD3.5 Large, nf4 base, paged 8-bit Lion, 512 px, batch 1) against a plain size."""
    assert check_main(["jobs/sd35-lowvram.yaml", "--gpu", "12GB", "--skip-paths"]) == 0
    out = capsys.readouterr().out
    assert "[ok]   memory   fits:" in out and "on a 12 GiB GPU" in out, out
    assert "(nf4 attention/feed-forward linears 5.34B, rest bf16)" in out
    assert "lion8bit_paged state (paged: counted on the GPU" in out
    assert check_main(["jobs/sd35-lowvram.yaml", "--gpu", "10GiB", "--skip-paths"]) == 1
    assert "over a 10 GiB GPU's 10.0 GiB" in capsys.readouterr().out
    # nf4 is what makes it fit: the same job with the base in bf16 is 5 GiB over
    assert check_main(["jobs/sd35-lowvram.yaml", "--gpu", "12GB", "--skip-paths", "--set", "model.quantize=none"]) == 1
    with pytest.raises(SystemExit):
        check_main(["jobs/sd35-lowvram.yaml", "--gpu", "twelve", "--skip-paths"])
    assert "a memory size such as 12GB" in capsys.readouterr().err


def test_the_one_machine_jobs_are_what_ships():
    assert {p.name for p in (ROOT / "jobs").glob("*.yaml") if load_job(p).model.pretrained not in TINY_MODELS
            and load_job(p).train.num_workers == "auto"} == set(MACHINE_JOBS)


@pytest.mark.parametrize("name", sorted(MACHINE_JOBS))
def test_each_one_machine_job_fits_its_machine(name, capsys):
    """Each job for one machine, on the node Ray would see there (its GPUs and their accelerator_type): one worker
    per GPU, a micro-batch the estimate fits under 90% of the card, the global batch split evenly, no shared mount."""
    from raytune_sd3.driver.microbatch import job_estimator
    from raytune_sd3.driver.placement import Cluster, check_placement, resolve_auto
    from raytune_sd3.models.catalogue import transformer_config

    card, gpus = MACHINE_JOBS[name]
    cfg = load_job(ROOT / "jobs" / name)
    assert not str(cfg.output_dir).startswith("/mnt/") and not str(cfg.cache_dir).startswith("/mnt/")
    node = Cluster(({"GPU": float(gpus), "CPU": 12.0 * gpus, f"accelerator_type:{card.split('-')[0]}": 1.0},))
    notes = resolve_auto(cfg, node)
    check_placement(cfg, node)
    t = cfg.train
    assert t.num_workers == gpus and t.batch_size * t.grad_accum * gpus == t.global_batch_size, notes
    config, _ = transformer_config(cfg.model.pretrained, None)
    gib = {"L4": 22.0, "H100": 79.6}[card.split("-")[0]]
    assert job_estimator(cfg, config, cfg.model.pretrained)(t.batch_size).total <= 0.9 * gib * GIB, notes
    if gpus == 1:  # and the check command agrees on the card
        assert check_main([str(ROOT / "jobs" / name), "--gpu", card, "--skip-paths"]) == 0
        assert "[ok]   memory   fits:" in capsys.readouterr().out
