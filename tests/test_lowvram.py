"""The low-VRAM preset's guards: nf4 and the 8-bit optimizers need bitsandbytes on CUDA, and a job that cannot have
them stops before Ray starts, saying why and what to use instead. (The nf4 layers themselves: test_quantize.py;
the 12 GB estimate: test_check.py.)"""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.preflight import bitsandbytes_problems, check_paths, needs_cuda_problem

ROOT = Path(__file__).resolve().parents[1]
LOWVRAM = ROOT / "jobs" / "sd35-lowvram.yaml"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _job(tmp_path: Path, *overrides: str):
    data = tmp_path / "photos"
    data.mkdir(exist_ok=True)
    return load_job(LOWVRAM, [f"output_dir={tmp_path / 'out'}", f"data.datasets.0.instance_data_dir={data}",
                              "model.pretrained=tiny-sd3", "validation.skip_layers=[1]", *overrides])  # tiny-sd3 has 2 blocks


def test_the_job_is_the_guides_lowest_vram_setup(tmp_path):
    cfg = load_job(LOWVRAM)
    assert (cfg.model.quantize, cfg.train.optimizer, cfg.train.batch_size, cfg.train.grad_accum) == (
        "nf4", "lion8bit_paged", 1, 1)
    assert cfg.data.datasets[0].resolution == 512 and cfg.train.strategy == "ddp" and cfg.train.num_workers == 1
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-3.5-large"


@needs_no_cuda
def test_nf4_without_cuda_stops_before_ray_with_the_alternative(tmp_path):
    cfg = _job(tmp_path, "train.optimizer=adamw")
    with pytest.raises(ConfigError) as err:
        check_paths(cfg)
    text = str(err.value)
    assert "model.quantize nf4 needs bitsandbytes on an NVIDIA GPU (CUDA)" in text
    assert "model.quantize: int4" in text and "this machine has no CUDA GPU" in text
    # the paged optimizer is refused the same way, and each gets its own line
    problems = bitsandbytes_problems(_job(tmp_path))
    assert len(problems) == 2 and "train.optimizer lion8bit_paged" in problems[1]
    # the quanto alternative it names passes the preflight
    check_paths(_job(tmp_path, "model.quantize=int4", "train.optimizer=lion"))


def test_without_bitsandbytes_the_error_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what the import system meets where it is missing
    with pytest.raises(ConfigError) as err:
        check_paths(_job(tmp_path))
    assert "model.quantize nf4: needs bitsandbytes, which is not installed here: pip install bitsandbytes" in str(
        err.value)
    assert "train.optimizer lion8bit_paged: needs bitsandbytes" in str(err.value)


def test_a_cluster_without_gpus_is_refused_once_ray_says_so(tmp_path, monkeypatch):
    """On a cluster (RAY_ADDRESS) the driver's own machine may have no GPU: only train.use_gpu decides, false now
    and `auto` once resolved against the cluster (cli.connect raises it, before caching)."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert bitsandbytes_problems(_job(tmp_path, "train.use_gpu=null")) == []
    assert "train.use_gpu is false" in bitsandbytes_problems(_job(tmp_path, "train.use_gpu=false"))[0]
    resolved = _job(tmp_path, "train.use_gpu=false")
    assert "this Ray cluster has none" in needs_cuda_problem(resolved)
    assert needs_cuda_problem(_job(tmp_path, "train.use_gpu=true")) is None
    assert needs_cuda_problem(_job(tmp_path, "train.use_gpu=false", "model.quantize=int4", "train.optimizer=lion")) is None


def test_the_worker_refuses_nf4_without_cuda_before_loading_the_model(tmp_path, monkeypatch):
    """The worker's own guard (the driver's preflight says it first): a worker without CUDA refuses nf4 with the
    alternative before it loads anything; on CUDA, or with a quanto kind, it goes on to load the model."""
    from raytune_sd3.models.quantize import NF4_NEEDS_CUDA
    from raytune_sd3.train import loop

    class Loading(Exception):
        pass

    def load_transformer(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(loop, "load_transformer", load_transformer)

    def worker(device: str, *overrides: str):
        run = loop.WorkerRun.__new__(loop.WorkerRun)  # its __init__ needs Ray Train's context; _setup_model does not
        run.cfg = _job(tmp_path, *overrides)
        run.t, run.pretrained, run.dtype, run.device = run.cfg.train, "tiny-sd3", torch.bfloat16, torch.device(device)
        return run

    with pytest.raises(RuntimeError) as refused:
        worker("cpu")._setup_model()
    assert str(refused.value) == NF4_NEEDS_CUDA and "model.quantize: int4" in NF4_NEEDS_CUDA
    with pytest.raises(Loading):
        worker("cuda")._setup_model()
    with pytest.raises(Loading):
        worker("cpu", "model.quantize=int4")._setup_model()


@needs_no_cuda
def test_the_train_command_exits_2_in_seconds_without_starting_ray(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", str(LOWVRAM), "--data", str(tmp_path),
                        "--set", f"output_dir={out}", "--set", "model.pretrained=tiny-sd3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nf4 needs bitsandbytes on an NVIDIA GPU" in r.stderr and "int4" in r.stderr
    assert not (out / "ray.log").exists() and not (out / "job.yaml").exists()  # Ray never started
    assert time.perf_counter() - t0 < 60


@needs_no_cuda
def test_connect_refuses_nf4_on_a_ray_cluster_without_gpus(tmp_path, ray_local):
    """The check after Ray: a real (local, CPU-only) Ray cluster resolves train.use_gpu auto to false."""
    from raytune_sd3.driver.cli import connect

    cfg = _job(tmp_path, "train.use_gpu=null")
    with pytest.raises(ConfigError, match="model.quantize nf4 needs bitsandbytes on CUDA GPUs, and this Ray cluster "
                                          "has none: use model.quantize: int4"):
        connect(cfg, verbose=True)
    assert cfg.train.use_gpu is False
    connect(_job(tmp_path, "train.use_gpu=null", "model.quantize=int4", "train.optimizer=lion"), verbose=True)


def test_the_check_judges_the_gpu_it_checks_against_not_this_machine(tmp_path, capsys):
    """python -m raytune_sd3.check --gpu 12GB on a laptop: the target has CUDA, so nf4 passes; a tiny job with no
    --gpu is checked against a CPU machine, where nf4 cannot run."""
    from PIL import Image

    from raytune_sd3.check import main as check_main

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 90, 0, 0)).save(data / f"{i}.png")
    base = [str(LOWVRAM), "--data", str(data), "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "model.pretrained=tiny-sd3", "--set", "data.eval_samples=0",
            "--set", "validation.skip_layers=[1]"]  # tiny-sd3 has 2 blocks
    assert check_main([*base, "--gpu", "12GB"]) == 0, capsys.readouterr().out
    assert "nf4" not in "".join(line for line in capsys.readouterr().out.splitlines() if "[FAIL]" in line)
    assert check_main(base) == 1
    out = capsys.readouterr().out
    assert "[FAIL] paths    model.quantize nf4 needs bitsandbytes on an NVIDIA GPU" in out
    assert "(the machine checked against has no GPU)" in out


def test_the_bitsandbytes_parts_of_a_job(tmp_path):
    assert _job(tmp_path).bitsandbytes_parts == ["model.quantize nf4", "train.optimizer lion8bit_paged"]
    assert _job(tmp_path, "model.quantize=int4", "train.optimizer=adamw8bit").bitsandbytes_parts == [
        "train.optimizer adamw8bit"]
    assert _job(tmp_path, "model.quantize=int4", "train.optimizer=lion").bitsandbytes_parts == []


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="checks a library that is installed")
def test_a_worker_without_bitsandbytes_parts_loads_diffusers_and_peft_without_it(ray_local):
    """leave_out_bitsandbytes in a Ray actor (as a training worker or an encoder calls it): diffusers and peft load
    and peft's LoRA trains without bitsandbytes, which stays unloaded; in the driver's process it does nothing."""
    import ray

    from raytune_sd3.models.loading import leave_out_bitsandbytes

    @ray.remote(num_cpus=0.1)
    class Worker:
        def run(self) -> tuple:
            from raytune_sd3.models.loading import leave_out_bitsandbytes

            leave_out_bitsandbytes()
            import peft
            from diffusers import SD3Transformer2DModel  # noqa: F401 - what a training worker loads

            model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                        peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
            model(torch.ones(1, 4)).sum().backward()
            grads = [p.grad is not None for n, p in model.named_parameters() if "lora_" in n]
            return sys.modules.get("bitsandbytes") is not None, importlib.util.find_spec("bitsandbytes"), grads

    loaded, spec, grads = ray.get(Worker.remote().run.remote())
    assert not loaded and spec is None and grads == [True, True]
    leave_out_bitsandbytes()
    assert "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None  # not in the driver's
