"""The optimizers of train.optimizer: against torch's AdamW and the libraries' own steps, hand-computed steps, bf16
stochastic rounding, exact resume from a state_dict, a small least-squares fit, and the one registry
(config.OPTIMIZERS) that every consumer reads."""

import contextlib
import importlib.util
import io
import math
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch

from raytune_sd3.config import OPTIMIZERS, TrainConfig, load_job
from raytune_sd3.convert.optimizer import NO_SIMPLETUNER_EQUIVALENT, SIMPLETUNER_OPTIMIZERS
from raytune_sd3.driver.preflight import needs_cuda_problem
from raytune_sd3.memory import estimate, lora_params
from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS, TransformerShape
from raytune_sd3.train.optim import (
    BUILDERS,
    AdamWBF16,
    Lion,
    StableAdamW,
    applied_lr,
    averaged_weights,
    is_schedule_free,
    make_optimizer,
    optimizer_metrics,
    start_training,
)

ROOT = Path(__file__).resolve().parents[1]

BF16_ULP_AT_1 = 2.0**-7  # spacing of bf16 values in [1, 2): 8 bits of mantissa


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: thread start-up, not math, dominates (and CI machines are shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(values, dtype=torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone().to(dtype))  # a copy, not an alias


def _random_grads(shape, steps: int, seed: int = 0) -> list[torch.Tensor]:
    # Scales vary step to step, so that StableAdamW's clip is active on some steps.
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (0.1, 1.0, 5.0)[i % 3] for i in range(steps)]


def _run(opt: torch.optim.Optimizer, p: torch.nn.Parameter, grads: list[torch.Tensor]) -> None:
    for g in grads:
        p.grad = g.to(p.dtype, copy=True)  # a copy: schedule-free divides the gradient in place
        opt.step()


def _torch_adamw(p, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW([p], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, foreach=False)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    # |x| in [2^(e-1), 2^e) -> bf16 spacing 2^(e-1-7)
    _, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), exponent - 8)


# --- adamw ---------------------------------------------------------------------------------------------------------


def test_adamw_is_torch_adamw_with_the_configs_hyperparameters():
    cfg = TrainConfig(optimizer="adamw", learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                      adam_epsilon=1e-6)
    p, q = _param(torch.linspace(-1, 1, 12)), _param(torch.linspace(-1, 1, 12))
    opt, ref = make_optimizer([p], cfg), _torch_adamw(q, cfg)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-3, (0.8, 0.95), 1e-6, 0.05)
    assert not group["fused"]  # plain on CPU
    for g in _random_grads(12, 5):
        _run(opt, p, [g])
        _run(ref, q, [g])
        assert torch.equal(p, q)


# --- adamw_bf16 ----------------------------------------------------------------------------------------------------


def test_adamw_bf16_on_fp32_params_is_adamw():
    cfg = TrainConfig(optimizer="adamw_bf16", learning_rate=1e-2, weight_decay=0.1)
    p, q = _param(torch.linspace(-2, 2, 64)), _param(torch.linspace(-2, 2, 64))
    opt, ref = make_optimizer([p], cfg), _torch_adamw(q, cfg)
    assert isinstance(opt, AdamWBF16)
    for g in _random_grads(64, 10):
        _run(opt, p, [g])
        _run(ref, q, [g])
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not torch.equal(p, _param(torch.linspace(-2, 2, 64)))  # it did move


def test_adamw_bf16_one_step_is_within_one_bf16_ulp_of_fp32_adamw():
    cfg = TrainConfig(optimizer="adamw_bf16", learning_rate=1e-3, weight_decay=0.1)
    start = torch.randn(4096, generator=torch.Generator().manual_seed(1)).bfloat16()
    grad = torch.randn(4096, generator=torch.Generator().manual_seed(2)).bfloat16()
    p, q = _param(start, torch.bfloat16), _param(start.float())
    _run(make_optimizer([p], cfg), p, [grad])
    _run(_torch_adamw(q, cfg), q, [grad.float()])
    assert p.dtype == torch.bfloat16
    err = (p.float() - q).abs()
    assert (err <= _bf16_ulp(q)).all(), err.max()
    assert (p != start).any() and (p.float() != q).any()  # some moved, and they are bf16 values, not fp32


def test_adamw_bf16_stochastic_rounding_is_unbiased():
    # Updates of a tenth of an ulp on params at 1.0: round-to-nearest loses every one of them, stochastic rounding
    # moves the mean by the right amount.
    steps, lr = 30, BF16_ULP_AT_1 / 10
    cfg = TrainConfig(optimizer="adamw_bf16", learning_rate=lr, weight_decay=0.0)
    p, nearest = _param(torch.ones(4096), torch.bfloat16), _param(torch.ones(4096), torch.bfloat16)
    grads = [-torch.ones(4096)] * steps  # constant gradient: AdamW's update is +lr per step
    _run(make_optimizer([p], cfg), p, grads)
    _run(_torch_adamw(nearest, cfg), nearest, grads)  # torch's AdamW on bf16 params rounds to nearest
    assert torch.equal(nearest, torch.ones_like(nearest))
    moved = p.float().mean().item() - 1.0
    assert moved == pytest.approx(steps * lr, rel=0.05)
    assert {v.item() for v in p.unique()} <= {1 + k * BF16_ULP_AT_1 for k in range(12)}  # bf16 values only


def test_adamw_bf16_same_seed_same_result():
    def run(seed: int) -> torch.Tensor:
        cfg = TrainConfig(optimizer="adamw_bf16", learning_rate=1e-3, seed=seed)
        p = _param(torch.linspace(-1, 1, 256), torch.bfloat16)
        _run(make_optimizer([p], cfg), p, _random_grads(256, 5))
        return p.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# --- stableadamw ---------------------------------------------------------------------------------------------------


def _stableadamw_by_hand(w, grads, lr, betas, eps, wd):
    """StableAdamW in plain Python floats, from the formula; returns (weights, the rms of each step)."""
    (b1, b2), n = betas, len(w)
    m, v, rms_seen = [0.0] * n, [0.0] * n, []
    for t, g in enumerate(grads, 1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        m_hat, v_hat = [mi / (1 - b1**t) for mi in m], [vi / (1 - b2**t) for vi in v]
        rms = math.sqrt(sum(gi * gi / max(vh, eps * eps) for gi, vh in zip(g, v_hat, strict=True)) / n)
        lr_t = lr / max(1.0, rms)
        w = [wi * (1 - lr_t * wd) - lr_t * mh / (math.sqrt(vh) + eps)
             for wi, mh, vh in zip(w, m_hat, v_hat, strict=True)]
        rms_seen.append(rms)
    return w, rms_seen


STABLE = dict(optimizer="stableadamw", learning_rate=0.1, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99)


def test_stableadamw_clips_a_gradient_spike():
    # Small gradients, then a large one: v lags behind, rms > 1 and the step shrinks.
    grads = [[0.1, 0.2, -0.1], [1.0, 0.5, -2.0]]
    expected, rms = _stableadamw_by_hand([1.0, -1.0, 0.5], grads, 0.1, (0.9, 0.99), 1e-8, 0.1)
    assert rms[1] == pytest.approx(1.3752, abs=1e-4)
    assert expected == pytest.approx([0.824969, -1.150295, 0.647023], abs=1e-6)
    cfg = TrainConfig(**STABLE)
    p, q = _param([1.0, -1.0, 0.5]), _param([1.0, -1.0, 0.5])
    opt = make_optimizer([p], cfg)
    assert isinstance(opt, StableAdamW)
    _run(opt, p, [torch.tensor(g) for g in grads])
    _run(_torch_adamw(q, cfg), q, [torch.tensor(g) for g in grads])
    torch.testing.assert_close(p, torch.tensor(expected), atol=1e-6, rtol=0)
    assert (p - q).abs().max() > 1e-3  # differs from AdamW where the clip is active


def test_stableadamw_is_adamw_when_rms_is_below_one():
    # Large gradients, then small ones: rms < 1, and the lr is not raised (max(1, rms)).
    grads = [[1.0, 0.5, -2.0], [0.1, 0.2, -0.1]]
    expected, rms = _stableadamw_by_hand([1.0, -1.0, 0.5], grads, 0.1, (0.9, 0.99), 1e-8, 0.1)
    assert rms[1] < 1
    cfg = TrainConfig(**STABLE)
    p, q = _param([1.0, -1.0, 0.5]), _param([1.0, -1.0, 0.5])
    _run(make_optimizer([p], cfg), p, [torch.tensor(g) for g in grads])
    _run(_torch_adamw(q, cfg), q, [torch.tensor(g) for g in grads])
    torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    torch.testing.assert_close(p, torch.tensor(expected), atol=1e-6, rtol=0)


# --- lion ----------------------------------------------------------------------------------------------------------


def test_lion_two_steps_by_hand():
    cfg = TrainConfig(optimizer="lion", learning_rate=0.1, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99)
    p = _param([1.0, -2.0, 0.5])
    opt = make_optimizer([p], cfg)
    assert isinstance(opt, Lion)
    # step 1, m = 0: update = sign(0.1 g) = [1, -1, 0]; w -= 0.1 (update + 0.1 w); m = 0.01 g
    _run(opt, p, [torch.tensor([0.5, -1.0, 0.0])])
    torch.testing.assert_close(p, torch.tensor([0.89, -1.88, 0.495]), atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.01, 0.0]), atol=1e-7, rtol=0)
    # step 2: b1 m + (1 - b1) g = [-0.0055, -0.007, 0.1]: the gradient sets the first sign, the momentum the second
    # (with b2 in its place the first sign would flip); m = 0.99 m + 0.01 g
    _run(opt, p, [torch.tensor([-0.1, 0.02, 1.0])])
    torch.testing.assert_close(p, torch.tensor([0.89 + 0.0911, -1.88 + 0.1188, 0.495 - 0.10495]), atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.00395, -0.0097, 0.01]), atol=1e-7, rtol=0)


# --- every optimizer -----------------------------------------------------------------------------------------------

CASES = [("adamw", torch.float32), ("adamw_bf16", torch.float32), ("adamw_bf16", torch.bfloat16),
         ("stableadamw", torch.float32), ("stableadamw", torch.bfloat16), ("lion", torch.float32),
         ("lion", torch.bfloat16)]
IDS = [f"{name}-{str(dtype).removeprefix('torch.')}" for name, dtype in CASES]


def _config(name: str) -> TrainConfig:
    if name == "lion":
        return TrainConfig(optimizer=name, learning_rate=5e-2, weight_decay=0.1, adam_beta2=0.99, seed=3)
    return TrainConfig(optimizer=name, learning_rate=5e-2, weight_decay=0.01, seed=3)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_state_dict_round_trip_resumes_exactly(name, dtype):
    cfg, grads, start = _config(name), _random_grads((8, 16), 8, seed=5), torch.randn(8, 16)
    full = _param(start, dtype)
    _run(make_optimizer([full], cfg), full, grads)

    first = _param(start, dtype)
    opt = make_optimizer([first], cfg)
    _run(opt, first, grads[:4])
    buf = io.BytesIO()
    torch.save({"weights": first.detach(), "optimizer": opt.state_dict()}, buf)  # as a checkpoint does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = torch.nn.Parameter(saved["weights"])
    opt = make_optimizer([resumed], cfg)
    opt.load_state_dict(saved["optimizer"])
    if dtype == torch.bfloat16:
        assert opt.state[resumed]["exp_avg"].dtype == torch.float32  # the moments of bf16 params stay fp32
    _run(opt, resumed, grads[4:])
    assert torch.equal(resumed, full)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=IDS)
def test_reduces_a_least_squares_loss(name, dtype):
    gen = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(64, 8, generator=gen), torch.randn(4, 8, generator=gen)
    y = x @ w_true.T
    w = _param(torch.zeros(4, 8), dtype)
    opt = make_optimizer([w], _config(name))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((x @ w.float().T - y) ** 2).mean()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(100):
        opt.step(closure)  # the optimizers run the closure with grad enabled inside their no_grad step
    assert closure().item() < 0.05 * initial


@pytest.mark.parametrize("name", ["adamw_bf16", "stableadamw", "lion"])
def test_params_without_grad_are_skipped(name):
    a, b = _param([1.0, 2.0]), _param([3.0, 4.0])
    opt = make_optimizer([a, b], _config(name))
    a.grad = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        opt.step()
    assert not torch.equal(a, torch.tensor([1.0, 2.0]))
    assert torch.equal(b, torch.tensor([3.0, 4.0])) and b not in opt.state


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "adamw8bit_paged", "lion8bit_paged"])
def test_8bit_optimizers_need_bitsandbytes(name, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is not installed
        with pytest.raises(RuntimeError, match="not installed") as err:
            make_optimizer([_param([1.0])], TrainConfig(optimizer=name))
    assert name in str(err.value) and "pip install bitsandbytes" in str(err.value)
    if importlib.util.find_spec("bitsandbytes") is None or torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="no GPU is visible") as err:  # installed (CPU build): still CUDA only
        make_optimizer([_param([1.0])], TrainConfig(optimizer=name))
    assert "train.optimizer: adamw" in str(err.value)


# --- bitsandbytes (its CPU back end here; on CPU its paged optimizers keep their state unpaged) -------------------

BNB_CASES = {"adamw8bit": ("AdamW8bit", False), "adamw8bit_paged": ("PagedAdamW8bit", True),
             "lion8bit": ("Lion8bit", False), "lion8bit_paged": ("PagedLion8bit", True)}


@pytest.mark.parametrize("name", list(BNB_CASES))
def test_8bit_optimizers_are_bitsandbytes_with_the_configs_hyperparameters(name, monkeypatch):
    """Each name builds its bitsandbytes class (paged where the name says so) with the job's lr, betas, eps and
    weight decay; over three steps its 8-bit moments give the 32-bit update within 5% (torch's AdamW for the
    AdamWs, our Lion for the Lions)."""
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CUDA guard: its CPU back end runs
    lion = name.startswith("lion")
    cfg = TrainConfig(optimizer=name, learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
                      adam_epsilon=1e-6)
    start, grads = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), _random_grads((64, 128), 3)
    p = _param(start)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU") if BNB_CASES[name][1] else (
            contextlib.nullcontext()):
        opt = make_optimizer([p], cfg)
        _run(opt, p, grads)
    cls, paged = BNB_CASES[name]
    assert type(opt) is getattr(bnb.optim, cls) and opt.is_paged is paged
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["betas"] == (0.8, 0.95)
    assert opt.defaults["weight_decay"] == 0.1 and (lion or opt.defaults["eps"] == 1e-6)
    assert opt.state[p]["state1"].dtype == torch.uint8  # 8-bit moments
    q = _param(start)
    reference = Lion([q], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, seed=0) if lion else _torch_adamw(q, cfg)
    _run(reference, q, grads)
    rel = ((p - q).norm() / (q - start).norm()).item()
    assert rel < 0.05, rel  # (Lion: a few signs flipped by the moment's rounding)


# --- the registry (config.OPTIMIZERS): every consumer knows every name ---------------------------------------------

REGISTRY = list(OPTIMIZERS)


def _cfg_for(name: str, **kw) -> TrainConfig:
    return TrainConfig(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-3, **kw)


def _build(name: str, params, monkeypatch, **kw):
    """make_optimizer for any name; bitsandbytes' on its CPU back end (past its CUDA guard)."""
    if OPTIMIZERS[name].package == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' paged optimizers warn that CPU state is not paged
        opt = make_optimizer(params, _cfg_for(name, **kw))
    start_training(opt)  # the loop's call before the first step (schedule-free steps only in train mode)
    return opt


@pytest.mark.parametrize("name", REGISTRY)
def test_every_registered_optimizer_is_known_everywhere(name, monkeypatch, tmp_path):
    """The schema's Literal, the factory, the memory estimate, the converter, the preflight and the docs all read
    or list config.OPTIMIZERS: a name added there and forgotten in one of them fails here."""
    facts = OPTIMIZERS[name]
    assert name in typing.get_args(TrainConfig.model_fields["optimizer"].annotation)
    assert name in TrainConfig.model_fields["optimizer"].description
    assert f"`{name}`" in (ROOT / "docs" / "guide.md").read_text()
    assert set(BUILDERS) == set(OPTIMIZERS)
    p = _param(torch.randn(64, 128))
    opt = _build(name, [p], monkeypatch)
    p.grad = torch.randn_like(p)
    opt.step()
    if facts.schedule_free:
        assert is_schedule_free(opt)
    shape = TransformerShape.from_config(KNOWN_TRANSFORMERS["stabilityai/stable-diffusion-3.5-medium"])
    rows = dict(estimate(shape, dtype="bf16",
                         targets="attention", rank=16, batch=1, resolution=512, t5_tokens=154, optimizer=name).lines)
    state = [v for k, v in rows.items() if k.startswith(f"{name} state")]
    assert state == [int(lora_params(shape, "attention", 16, None) * facts.state_bytes(4))]  # fp32 LoRA
    converted = {ours for ours, *_ in SIMPLETUNER_OPTIMIZERS.values()}
    assert name in converted or name in NO_SIMPLETUNER_EQUIVALENT
    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", f"train.optimizer={name}",
                                                 "train.use_gpu=false", "train.lr_scheduler=constant",
                                                 f"train.learning_rate={1.0 if name == 'prodigy' else 1e-3}"])
    assert (needs_cuda_problem(job) is not None) == facts.cuda_only


def _state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))


STATE_CASES = [(name, dtype) for name in REGISTRY for dtype in (torch.float32, torch.bfloat16)
               if not (OPTIMIZERS[name].package == "bitsandbytes" and dtype == torch.bfloat16)]


@pytest.mark.parametrize(("name", "dtype"), STATE_CASES,
                         ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in STATE_CASES])
def test_the_registrys_state_size_is_what_one_step_keeps(name, dtype, monkeypatch):
    """After one step, the tensors in the optimizer's state hold what config.OPTIMIZERS says per parameter (the
    memory estimate's figure), within bitsandbytes' blockwise scales (4 bytes per 256) and the step counters."""
    # non-zero: Prodigy keeps a scalar p0 for an all-zero tensor; large: bitsandbytes' 256-entry quantisation maps
    # (1 KiB per moment) are a fixed cost
    p = _param(torch.randn(256, 512), dtype)
    opt = _build(name, [p], monkeypatch)
    p.grad = torch.randn(256, 512).to(dtype)
    opt.step()
    per_param = _state_bytes(opt, p) / p.numel()
    expected = OPTIMIZERS[name].state_bytes(p.element_size())
    assert expected <= per_param <= expected * 1.03, (per_param, expected)


# --- prodigy -------------------------------------------------------------------------------------------------------

PRODIGY = dict(optimizer="prodigy", learning_rate=1.0, weight_decay=0.01, adam_beta1=0.85, adam_beta2=0.98,
               adam_epsilon=1e-7, prodigy={"d_coef": 2.0, "d0": 1e-5, "growth_rate": 1.5, "safeguard_warmup": True,
                                           "use_bias_correction": True})


def _steady_grads(shape, steps: int) -> list[torch.Tensor]:
    """Gradients with a steady direction (as on a loss surface), so that Prodigy's estimate of d grows."""
    return [g * 0.3 + 1.0 for g in _random_grads(shape, steps)]


def test_prodigy_is_the_librarys_step_with_the_configs_settings():
    from prodigyopt import Prodigy

    cfg = TrainConfig(**PRODIGY)
    start, grads = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), _steady_grads((8, 16), 6)
    p, q = _param(start), _param(start)
    opt = make_optimizer([p], cfg)
    ref = Prodigy([q], lr=1.0, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.01, decouple=True, d_coef=2.0, d0=1e-5,
                  growth_rate=1.5, safeguard_warmup=True, use_bias_correction=True)
    for g in grads:
        _run(opt, p, [g])
        _run(ref, q, [g])
        assert torch.equal(p, q) and opt.param_groups[0]["d"] == ref.param_groups[0]["d"]
    d = opt.param_groups[0]["d"]
    assert 1e-5 < d <= 1e-5 * 1.5 ** 5  # it adapted, no faster than growth_rate allows
    assert optimizer_metrics(opt) == {"prodigy_d": d}


def test_prodigys_first_step_by_hand():
    """Step 1 with d = d0 (p0 = p, so d's numerator is 0 and d stays d0), no bias correction:
        m = d0 (1 - b1) g;  v = d0^2 (1 - b2) g^2;  w = w (1 - wd d0 lr) - d0 lr m / (sqrt(v) + d0 eps)"""
    lr, b1, b2, eps, wd, d0 = 1.0, 0.9, 0.99, 1e-8, 0.1, 1e-6
    cfg = TrainConfig(optimizer="prodigy", learning_rate=lr, adam_beta1=b1, adam_beta2=b2, adam_epsilon=eps,
                      weight_decay=wd, prodigy={"d0": d0})
    w, g = [1.0, -2.0, 0.5], [0.3, 0.0, -4.0]
    p = _param(w)
    _run(make_optimizer([p], cfg), p, [torch.tensor(g)])
    expected = [wi * (1 - wd * d0 * lr) - d0 * lr * (d0 * (1 - b1) * gi) / (math.sqrt(d0**2 * (1 - b2) * gi * gi)
                                                                            + d0 * eps) for wi, gi in zip(w, g, strict=True)]
    torch.testing.assert_close(p, torch.tensor(expected), atol=1e-7, rtol=0)


def test_prodigy_at_a_learning_rate_meant_for_adam_is_refused_at_the_door():
    with pytest.raises(ValueError, match=r"train.learning_rate 0.0001 with train.optimizer prodigy.*set "
                                         r"train.learning_rate: 1.0"):
        TrainConfig(optimizer="prodigy", learning_rate=1e-4)


@pytest.mark.parametrize("name", [n for n, f in OPTIMIZERS.items() if f.not_under_zero])
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_optimizers_that_need_every_parameter_are_refused_under_zero(name, strategy):
    with pytest.raises(ValueError, match=f"train.optimizer {name} does not run under train.strategy {strategy}: "
                                         ".*use train.strategy: ddp"):
        _cfg_for(name, strategy=strategy)


# --- adamw_schedulefree --------------------------------------------------------------------------------------------


def _schedule_free_by_hand(w, grads, lr, b1, b2, eps, wd, warmup):
    """Schedule-free AdamW (Defazio et al. 2024, the schedulefree package's weighting c_t = lr_max^2 / sum of
    lr_max^2) in plain floats: returns (x, y) after the steps, x the average (eval mode), y the training point."""
    z, x, v = list(w), list(w), [0.0] * len(w)
    lr_max, weight_sum = -1.0, 0.0
    for k, g in enumerate(grads):
        y = [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x, strict=True)]  # the gradient is taken at y
        lr_k = lr * min(1.0, (k + 1) / warmup) if warmup else lr
        lr_max = max(lr_max, lr_k)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        step = [gi / (math.sqrt(vi / (1 - b2 ** (k + 1))) + eps) + wd * yi for gi, vi, yi in zip(g, v, y, strict=True)]
        z = [zi - lr_k * si for zi, si in zip(z, step, strict=True)]
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z, strict=True)]
    return x, [(1 - b1) * zi + b1 * xi for zi, xi in zip(z, x, strict=True)]


def test_schedule_free_is_the_formula_and_eval_mode_holds_the_average():
    """Three steps, warmup 2: in train mode the params hold y, inside averaged_weights the average x, and after it
    y again; the library's own optimizer built with the same settings takes the same steps bitwise."""
    from schedulefree import AdamWScheduleFree

    cfg = TrainConfig(optimizer="adamw_schedulefree", learning_rate=0.1, weight_decay=0.01, adam_beta1=0.9,
                      adam_beta2=0.99, lr_warmup_steps=2)
    w, grads = [1.0, -2.0, 0.5], [[0.3, -1.0, 2.0], [0.1, 0.5, -1.0], [-0.2, 0.2, 0.4]]
    x, y = _schedule_free_by_hand(w, grads, 0.1, 0.9, 0.99, 1e-8, 0.01, warmup=2)
    p, q = _param(w), _param(w)
    opt = make_optimizer([p], cfg)
    ref = AdamWScheduleFree([q], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, warmup_steps=2)
    start_training(opt)
    ref.train()
    for g in grads:
        assert applied_lr(opt, 0.1) == pytest.approx(0.1 * min(1.0, (opt.param_groups[0]["k"] + 1) / 2))
        _run(opt, p, [torch.tensor(g)])
        _run(ref, q, [torch.tensor(g)])
    assert torch.equal(p, q)
    torch.testing.assert_close(p, torch.tensor(y), atol=1e-6, rtol=0)
    with averaged_weights(opt), averaged_weights(opt):  # nested: one switch
        torch.testing.assert_close(p, torch.tensor(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(p, torch.tensor(y), atol=1e-6, rtol=0)
    assert (torch.tensor(x) - torch.tensor(y)).abs().max() > 1e-3  # the two points differ: the switch matters


def test_schedule_free_refuses_a_decaying_schedule_at_the_door():
    with pytest.raises(ValueError, match="train.lr_scheduler cosine: train.optimizer adamw_schedulefree replaces the "
                                         "LR schedule .* set train.lr_scheduler: constant"):
        TrainConfig(optimizer="adamw_schedulefree", lr_scheduler="cosine")


def test_other_optimizers_are_untouched_by_averaged_weights():
    p = _param([1.0, 2.0])
    opt = make_optimizer([p], TrainConfig(optimizer="adamw"))
    _run(opt, p, [torch.tensor([1.0, -1.0])])
    before = p.detach().clone()
    start_training(opt)
    with averaged_weights(opt):
        assert torch.equal(p, before)
    assert not is_schedule_free(opt) and applied_lr(opt, 0.5) == 0.5 and optimizer_metrics(opt) == {}



def test_the_loops_eval_loss_of_a_schedule_free_run_is_measured_at_its_average(tiny_sd3):
    """WorkerRun.evaluate on real steps of the tiny model: the eval loss is that of the average x (eval mode), not
    of the training point y the params hold between steps, and training goes on at y after it."""
    from raytune_sd3.train.validation import eval_loss
    from tests.worker_run import tiny_run

    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["train.num_workers=1", "train.mixed_precision=no", "model.dtype=fp32",
                                                  "train.optimizer=adamw_schedulefree", "train.lr_scheduler=constant",
                                                  "train.lr_warmup_steps=0"])
    run = tiny_run(tiny_sd3, cfg)
    start_training(run.optimizer)  # as WorkerRun.run does
    for step in (1, 2, 3):
        run.train_step(step)
    g = torch.Generator().manual_seed(99)
    run.eval_batches = {"latents": torch.randn(2, 16, 8, 8, generator=g),
                        "prompt_embeds": torch.randn(2, 12, 96, generator=g), "pooled": torch.randn(2, 80, generator=g)}
    model, cpu = run.strategy.transformer, torch.device("cpu")
    at_y = eval_loss(model, run.eval_batches, cfg.flow, cpu)
    with averaged_weights(run.optimizer):
        at_x = eval_loss(model, run.eval_batches, cfg.flow, cpu)
    assert run.evaluate() == at_x != at_y
    assert run.optimizer.param_groups[0]["train_mode"] and eval_loss(model, run.eval_batches, cfg.flow, cpu) == at_y

# --- resume: a checkpoint as the loop writes it (inside averaged_weights), read back as the loop reads it -----------


def _checkpoint(p: torch.nn.Parameter, opt) -> dict:
    buf = io.BytesIO()
    with averaged_weights(opt):  # WorkerRun.report
        torch.save({"weights": p.detach().clone(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cfg", [TrainConfig(**PRODIGY),
                                 TrainConfig(optimizer="adamw_schedulefree", learning_rate=0.05, lr_warmup_steps=3)],
                         ids=["prodigy", "adamw_schedulefree"])
def test_resume_restores_the_adaptive_state_exactly(cfg):
    """A run checkpointed at step 4 and resumed ends bitwise where the uninterrupted one (which also checkpointed
    at step 4) ends: Prodigy's d and its sums, schedule-free's z, x and its weight sum come back."""
    grads, start = _steady_grads((8, 16), 8), torch.randn(8, 16)
    full = _param(start)
    opt = make_optimizer([full], cfg)
    start_training(opt)
    _run(opt, full, grads[:4])
    saved_groups = [dict(g) for g in opt.param_groups]
    _checkpoint(full, opt)
    _run(opt, full, grads[4:])

    first = _param(start)
    opt = make_optimizer([first], cfg)
    start_training(opt)
    _run(opt, first, grads[:4])
    saved = _checkpoint(first, opt)

    resumed = torch.nn.Parameter(saved["weights"])
    opt = make_optimizer([resumed], cfg)
    opt.load_state_dict(saved["optimizer"])
    for key in ("d", "d_max", "d_numerator", "k", "weight_sum", "lr_max"):
        if key in saved_groups[0]:
            assert opt.param_groups[0][key] == saved_groups[0][key], key
    if cfg.optimizer == "prodigy":
        assert opt.param_groups[0]["d"] > cfg.prodigy.d0
    else:
        assert not torch.equal(saved["weights"], first)  # saved: the average x; trained: y
    start_training(opt)  # schedule-free: the loaded x back to y
    _run(opt, resumed, grads[4:])
    assert torch.equal(resumed, full)


@pytest.mark.parametrize("name", [n for n, f in OPTIMIZERS.items() if f.package not in (None, "bitsandbytes")])
def test_an_optimizer_whose_package_is_missing_stops_at_the_preflight(name, monkeypatch, tmp_path):
    from raytune_sd3.config import ConfigError
    from raytune_sd3.driver.preflight import check_paths

    job = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", f"train.optimizer={name}",
                                                 "train.lr_scheduler=constant", "validation.prompts=[]",
                                                 f"train.learning_rate={1.0 if name == 'prodigy' else 1e-3}"])
    check_paths(job)  # installed: nothing to say
    monkeypatch.setitem(sys.modules, OPTIMIZERS[name].package, None)  # what find_spec meets where it is not installed
    with pytest.raises(ConfigError, match=f"train.optimizer {name}: needs the {OPTIMIZERS[name].package} package, "
                                          f"which is not installed here: pip install {OPTIMIZERS[name].package}"):
        check_paths(job)
