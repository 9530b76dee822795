"""The benchmark scripts (benchmarks/) work: the gpu benchmark at --cpu-smoke size, its training-FLOP formula, the
RESULTS.md writer, and (slow) the CPU benchmarks end to end. Speed is measured by the benchmarks, never asserted."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/gpu.py and common.py as modules (the scripts import each other by file name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import common
    import gpu

    return gpu, common


def run_script(name: str, *args: str, timeout: int) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_gpu_cpu_smoke_prints_figures_and_counts_the_forward_like_flopcountermode(bench, tmp_path):
    gpu, _ = bench
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    fp8 = ["fp8"] if importlib.util.find_spec("torchao") is None else []  # without torchao the lever must fail alone
    stdout = run_script("gpu.py", "--cpu-smoke", "--steps", "2", "--levers", *fp8, "skip-lora-casts", "math",
                        "--profile", "1", "--json", str(out), "--results", str(results), timeout=300)
    assert "images/s" in stdout and "peak memory" in stdout and "forward" in stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["resolution"], r["layers"], r["heads"]) for r in rows] == [
        ("large", 256, 2, 4), ("medium", 256, 2, 4)]
    cpu = torch.device("cpu")
    for r in rows:
        assert r["images_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["memory_kind"] == "process peak RSS"
        # The same model and batch, counted here by FlopCounterMode directly (the CPU's fused attention has no
        # FLOP formula: the math kernel's matmuls are what gets counted, as in the script).
        spec = gpu.model_config(r["model"], layers=2, heads=4)
        model, params = gpu.build_transformer(spec, cpu, torch.float32, rank=16, targets="attention")
        trainer = gpu.Trainer(model, params, gpu.make_batch(spec, 256, 1, 154, cpu, torch.float32), autocast=False)
        with (torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]),
              FlopCounterMode(display=False) as counter):
            trainer.forward_loss()
        assert r["forward_flops"] == counter.get_total_flops() > 0
        assert r["breakdown"]["attention"] > 0 and r["breakdown"]["lora"] > 0
        # the formula = FlopCounterMode over a whole forward + backward (math attention: backward = 2x forward)
        assert r["counted_step_flops"] == r["train_flops"]
        # one more step under the profiler: no GPU kernels here, and CPU AdamW reads each parameter's step count
        assert r["profile"]["steps"] == 1 and r["profile"]["device_busy"] is None and r["profile"]["reads"] > 0
        # each lever timed on its own on the same model, against this row
        assert [lv["lever"] for lv in r["levers"]] == ["skip-lora-casts", "math", *fp8]  # in-place ones last
        assert all(lv["images_per_s"] > 0 and lv["ratio"] == lv["images_per_s"] / r["images_per_s"]
                   for lv in r["levers"] if lv["lever"] != "fp8")
        assert not fp8 or "No module named 'torchao'" in r["levers"][-1]["error"]
    text = results.read_text()
    assert "## gpu: smoke run on the CPU (reduced size)" in text and "Pending a GPU machine" in text
    assert "| large | 256px | 1 | math |" in text


@pytest.mark.parametrize("input_needs_grad, expected", [(False, 528), (True, 816)])
def test_training_flop_formula_on_a_tiny_lora_linear(bench, input_needs_grad, expected):
    """x (3, 8) through a frozen Linear(8, 4) with a rank-2 LoRA, by hand (a matmul of (n,k)x(k,m) is 2nkm):
    forward: base 2*3*8*4 = 192, A 2*3*8*2 = 96, B 2*3*2*4 = 48 -> 336
    backward: B weight 48 + B input 48; A weight 96; and, only if x needs a gradient, base input 192 + A input 96
    -> 336 + 192 = 528 with x as data, 528 + 288 = 816 with x inside a network."""
    gpu, _ = bench
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"), model)
    x = torch.randn(3, 8, requires_grad=input_needs_grad)

    count = gpu.count_flops(model, lambda: model(x))
    assert count.forward == 336 and count.attention == 0
    assert count.breakdown() == {"lora": 144, "frozen, input needs grad": 192 if input_needs_grad else 0,
                                 "frozen, on data": 0 if input_needs_grad else 192, "attention": 0}
    assert count.training() == expected
    with FlopCounterMode(display=False) as counter:  # and torch agrees
        model(x).sum().backward()
    assert counter.get_total_flops() == expected


def test_results_sections_are_replaced_in_place_and_others_kept(bench, tmp_path):
    _, common = bench
    path = tmp_path / "RESULTS.md"
    common.write_section("step: ours vs reference", "first figures", path)
    common.write_section("Memory estimate vs measured", "another developer's table", path)
    common.write_section("step: ours vs reference", "second figures\n\n| a | b |", path)
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.count("## step: ours vs reference") == 1 and "second figures" in text and "first" not in text
    assert text.index("## step") < text.index("## Memory estimate vs measured")
    assert "another developer's table" in text
    info = common.machine()
    assert {"date", "cpu", "cores", "gpu", "torch", "ray", "diffusers", "peft"} <= set(info)
    assert "torch " in common.machine_line(info)


def test_interleaved_reference_steps_are_taken_out_of_ours(bench):
    """step.py runs one reference step at the start of each of ours (inside our batch read); JobRun must take each
    out of the step it ran in and pair it with that step. Timings as (start, end, cpu start, cpu end)."""
    _, common = bench
    ours, ref = [0.040, 0.050, 0.041, 0.060], [0.030, 0.020, 0.031, 0.032]
    data, reference, metrics, now = [], [], [], 100.0
    for k in range(4):  # step k: reference step, batch read (1 ms), the rest of our step
        reference.append((now, now + ref[k], now, now + ref[k]))
        data.append((now + ref[k], now + ref[k] + 0.001, now + ref[k], now + ref[k] + 0.001))
        metrics.append({"step": k + 1, "step_time_s": ref[k] + ours[k]})
        now += ref[k] + ours[k]
    run = common.JobRun(metrics, [{"data": data, "reference": reference, "report": []}], 0.0, 1.0)
    assert run.periods(0) == pytest.approx(ours[:3])  # step k to step k+1, less reference step k+1
    assert run.cpu_periods(1) == pytest.approx(ours[1:3])
    assert run.reference(0) == pytest.approx(ref[1:])  # the reference step taken out of each period
    assert run.in_step(1) == pytest.approx(ours[1:3])  # the last step is left out


@pytest.mark.bench
def test_step_and_scaling_benchmarks_run(tmp_path):
    """The CPU benchmarks end to end at their smallest (a real TorchTrainer each); figures are not checked."""
    results = str(tmp_path / "RESULTS.md")
    out = run_script("step.py", "--steps", "6", "--warmup", "2", "--repeats", "1",
                     "--results", results, timeout=600)
    assert "ours/reference, wall step to step" in out and "ray.train.report" in out
    out = run_script("scaling.py", "--steps", "5", "--warmup", "1", "--repeats", "1", "--results", results,
                     timeout=600)
    assert "all-reduce" in out and "| 2 |" in out
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## step: ours vs reference" in text and "## scaling: 1 and 2 workers" in text


@pytest.mark.bench
def test_overhead_benchmark_runs(tmp_path):
    out = run_script("overhead.py", "--repeats", "1", "--results", str(tmp_path / "RESULTS.md"), timeout=600)
    assert "Ray start" in out and "model load" in out and "first step" in out and "bare loop" in out


@pytest.mark.bench
def test_caching_benchmark_runs(tmp_path):
    out = run_script("caching.py", "--images", "14", "--captions", "5", "--repeats", "1", "--results",
                     str(tmp_path / "RESULTS.md"), timeout=600)
    assert "Ray Data pipeline" in out and "single-process loop" in out and "KiB of latents per image" in out
    assert "## caching" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.bench
def test_estimate_benchmark_runs(tmp_path):
    out = run_script("estimate.py", "--results", str(tmp_path / "R.md"), timeout=600)
    assert "| SD3.5 Large | 4 | 81.7 |" in out and out.count("| SD3 Medium | all |") == 2
    assert "## memory estimate under bf16 autocast" in (tmp_path / "R.md").read_text()


@pytest.mark.bench
def test_load_benchmark_runs(tmp_path):
    from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS
    from raytune_sd3.testmodels.shaped import build_shaped_pipeline

    small = dict(KNOWN_TRANSFORMERS["stabilityai/stable-diffusion-3.5-medium"], num_layers=2, num_attention_heads=2,
                 caption_projection_dim=128, dual_attention_layers=[0], pos_embed_max_size=96, sample_size=8)
    pipeline = build_shaped_pipeline(tmp_path / "pipeline", small, device="cpu")
    out = run_script("load.py", "--pipeline", str(pipeline), "--repeats", "1", "--results", str(tmp_path / "R.md"),
                     timeout=300)
    assert "| diffusers |" in out and "| ours |" in out and "pos_embed_max_size 96" in out
    assert "## model load" in (tmp_path / "R.md").read_text()


@pytest.mark.bench
def test_warmstart_benchmark_runs(tmp_path):
    out = run_script("warmstart.py", "--sizes", "200,400", "--repeats", "1", "--results", str(tmp_path / "R.md"),
                     timeout=300)
    assert "| 400 |" in out and "1,000,000 images" in out and "old/new" in out
    assert "## warm start" in (tmp_path / "R.md").read_text()


@pytest.mark.bench
def test_store_benchmark_runs(tmp_path):
    out = run_script("store.py", "--objects", "200", "--folders", "4", "--repeats", "1", "--results",
                     str(tmp_path / "R.md"), timeout=300)
    assert "| our listing (sub-folders in threads) |" in out and "our own, minutes at 1M" in out
    assert "Our own cost: cold discovery" in out and "What a real store changes" in out
    assert "## a data set in a bucket" in (tmp_path / "R.md").read_text()


@pytest.mark.bench
def test_gpu_product_loop_beside_the_bare_step_cpu_smoke(tmp_path):
    """gpu.py --product at --cpu-smoke size: the product's loop runs on a shaped pipeline of the bare step's
    architecture for the same steps, and the table of both is written (figures are not checked)."""
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    stdout = run_script("gpu.py", "--cpu-smoke", "--models", "medium", "--steps", "2", "--product", "--profile", "2",
                        "--workdir", str(tmp_path / "work"), "--json", str(out), "--results", str(results), timeout=600)
    assert "x the bare step" in stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["product_steps_timed"] == 2 and row["product_ratio"] > 0 and row["product_images_per_s"] > 0
    assert row["product_profile"]["steps"] == 2 and row["profile"]["steps"] == 2  # profiled after the timed steps
    assert set(row["product_startup"]) == {"workers start", "model load", "setup", "first step"}
    assert all(v > 0 for v in row["product_startup"].values()) and row["product_prepare_s"] > 0
    assert "product/bare, in-step" in results.read_text() and "fit() to first step" in results.read_text()


@pytest.mark.bench
def test_gpu_lease_script_rehearses_every_stage_on_the_cpu(tmp_path):
    """SMOKE=1 runs the lease script's stages at --cpu-smoke size: each exits 0 and writes its table."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path / "out"), "BENCH_DIR": str(tmp_path / "work")}
    proc = subprocess.run(["bash", str(BENCH / "gpu_lease.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = ["large", "estimate", "medium", "caching", "compile"]
    assert all(f"{name} rc=0" in proc.stdout for name in stages), proc.stdout[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lease.tar.gz", "results.md"]  # <= 8 come back
    results = (tmp_path / "out" / "results.md").read_text()
    assert "## gpu: smoke run" in results and "## caching" in results
    with tarfile.open(tmp_path / "out" / "lease.tar.gz") as tar:
        names = set(tar.getnames())
    assert all(f"./{name}.log" in names and f"./{name}.md" in names for name in stages), names
