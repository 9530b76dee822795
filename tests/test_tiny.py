"""Tests for the tiny offline SD3 / SD3.5 pipelines (raytune_sd3.testmodels.tiny)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from raytune_sd3.config import TINY_MODELS
from raytune_sd3.testmodels import tiny
from raytune_sd3.testmodels.tiny import build_tiny_pipeline, ensure_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Toy-sized tensors gain nothing from intra-op threads, and on a busy CI box (e.g. Ray workers running
    # alongside) the thread pool's contention made each pipeline call up to 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd3")


@pytest.fixture(scope="module")
def sd3(sd3_dir: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(sd3_dir)


def _generate(pipe: StableDiffusion3Pipeline, **kwargs) -> np.ndarray:
    return pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(path)): load_file(f) for f in sorted(path.glob("*/*.safetensors"))}


def test_components_load_with_expected_classes_and_sizes(sd3_dir: Path, sd3: StableDiffusion3Pipeline) -> None:
    assert not list(sd3_dir.rglob("*.bin")), "weights must be safetensors, not pickles"
    expected = {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "tokenizer_3": T5Tokenizer,
    }
    for name, cls in expected.items():
        assert isinstance(getattr(sd3, name), cls), name

    # The widths differ on purpose; they must add up the way the pipeline concatenates and pads them.
    clip_l, clip_g, t5 = sd3.text_encoder.config, sd3.text_encoder_2.config, sd3.text_encoder_3.config
    assert (clip_l.hidden_size, clip_g.hidden_size, t5.d_model) == (32, 48, 96)
    assert sd3.transformer.config.pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim == 80
    assert sd3.transformer.config.joint_attention_dim == t5.d_model
    assert sd3.vae.config.latent_channels == sd3.transformer.config.in_channels == 16
    assert sd3.vae_scale_factor == 8
    assert sd3.transformer.config.qk_norm is None and not sd3.transformer.config.dual_attention_layers

    assert len(sd3.tokenizer) == clip_l.vocab_size
    assert len(sd3.tokenizer_2) == clip_g.vocab_size
    assert len(sd3.tokenizer_3) <= t5.vocab_size
    assert sd3.tokenizer.model_max_length == sd3.tokenizer_2.model_max_length == 77
    assert sd3.tokenizer_3.model_max_length == 512
    assert sd3.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2", "tokenizer_3"])
def test_tokenizers_know_the_caption_words(sd3: StableDiffusion3Pipeline, name: str) -> None:
    tok = getattr(sd3, name)
    ids = tok(PROMPT).input_ids
    assert len(ids) > 3 and tok.unk_token_id not in ids[:-1]  # CLIP's unk is its eos, which ends the ids
    # Corpus words are whole tokens, so captions don't degrade into characters.
    for word in ["red", "blue", "purple", "circle", "triangle", "star", "background", "small", "large"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("max_sequence_length", [256, 154])
def test_pipeline_call_and_prompt_embedding_shapes(sd3: StableDiffusion3Pipeline, max_sequence_length: int) -> None:
    embeds, _, pooled, _ = sd3.encode_prompt(
        PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    assert embeds.shape == (1, 77 + max_sequence_length, 96)  # CLIP tokens, then T5 tokens
    assert pooled.shape == (1, 80)
    image = _generate(sd3, max_sequence_length=max_sequence_length)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_sd35_variant(tmp_path: Path) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(build_tiny_pipeline(tmp_path / "tiny-sd35", sd35=True))
    config = pipe.transformer.config
    assert config.qk_norm == "rms_norm"
    assert list(config.dual_attention_layers) == [0]
    assert pipe.transformer.transformer_blocks[0].use_dual_attention
    assert not pipe.transformer.transformer_blocks[1].use_dual_attention
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_same_seed_same_pipeline_other_seed_other_weights(sd3_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_draw), "building must not disturb the caller's RNG"
    other = build_tiny_pipeline(tmp_path / "other", seed=1)

    reference, same, different = _weights(sd3_dir), _weights(again), _weights(other)
    assert "transformer/diffusion_pytorch_model.safetensors" in reference
    assert len(reference) == 5  # transformer, vae and the three text encoders
    for file, tensors in reference.items():
        assert tensors.keys() == same[file].keys(), file
        assert all(torch.equal(t, same[file][k]) for k, t in tensors.items()), file
        assert not all(torch.equal(t, different[file][k]) for k, t in tensors.items()), file
    # Tokenizers are reproducible too, so separately built copies (e.g. one per node) agree on token ids.
    for name in ["tokenizer", "tokenizer_2", "tokenizer_3"]:
        assert (sd3_dir / name / "tokenizer.json").read_bytes() == (again / name / "tokenizer.json").read_bytes()


def test_ensure_builds_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYTUNE_SD3_HOME", str(tmp_path))
    path = ensure_tiny_pipeline("tiny-sd3")
    assert path == tmp_path / "models" / "tiny-sd3"
    mtime = (path / "model_index.json").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("ensure_tiny_pipeline rebuilt a cached pipeline")

    monkeypatch.setattr(tiny, "_components", must_not_build)
    assert ensure_tiny_pipeline("tiny-sd3") == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-sd3"]  # no temp dirs left behind
    assert TINY_MODELS == ("tiny-sd3", "tiny-sd35")
    with pytest.raises(ValueError):
        ensure_tiny_pipeline("tiny-sdxl")

    # A CLI driver resolves the built pipeline without importing the builder's diffusers (~7 s on 2 cores).
    probe = ("import sys; from raytune_sd3.testmodels.resolve import resolve_pretrained; "
             "print(resolve_pretrained('tiny-sd3')); print('diffusers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "RAYTUNE_SD3_HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(path), "False"]


def test_losing_the_rename_race_keeps_the_winner(
    sd3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models" / "tiny-sd3"
    components = tiny._components

    def other_process_finishes_first(*args, **kwargs):
        shutil.copytree(sd3_dir, out)
        (out / "winner").touch()
        return components(*args, **kwargs)

    monkeypatch.setattr(tiny, "_components", other_process_finishes_first)
    assert build_tiny_pipeline(out) == out
    assert (out / "winner").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-sd3"]  # our temp copy was discarded


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a pipeline")
    with pytest.raises(FileExistsError):
        build_tiny_pipeline(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_writes_a_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "cli-sd35"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "raytune_sd3.testmodels", str(out), "--sd35", "--seed", "3"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert json.loads((out / "transformer" / "config.json").read_text())["qk_norm"] == "rms_norm"
