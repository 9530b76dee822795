"""lora.init_from: the LoRA files a run can start from (ours, diffusers' layouts), what the door refuses, and a run
from our own file starting exactly where the old one ended (the same eval loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raytune_sd3.config import ConfigError, LoraConfig, load_job
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.models.loading import load_transformer
from raytune_sd3.models.lora import LORA_FILE, add_lora, export_lora, lora_state_dict
from raytune_sd3.models.lora_files import load_lora_file, read_lora_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "tiny.yaml"


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "timestep": torch.tensor([300.0, 800.0]),
            "encoder_hidden_states": torch.randn(2, 154, 96, generator=g),
            "pooled_projections": torch.randn(2, 80, generator=g), "return_dict": False}


def _trained(tiny_sd3: str, cfg: LoraConfig):
    transformer = load_transformer(tiny_sd3)
    params = add_lora(transformer, cfg, seed=0)
    with torch.no_grad():  # stands in for training: B != 0
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def _output(transformer) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**_inputs())[0]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_run_from_our_file_starts_where_the_old_one_ended(tiny_sd3, tmp_path, kind):
    """Our saved file (a folder or the file itself) read back: its kind, rank, alpha (folded: the rank) and layers,
    and an adapter loaded from it gives the trained model's output and eval loss (the loop's eval_loss on the
    same eval batches): a new run's step-0 eval loss is the old run's last."""
    from raytune_sd3.config import FlowConfig
    from raytune_sd3.train.validation import eval_loss

    cfg = LoraConfig(rank=4, targets="attention+context", kind=kind)
    old = _trained(tiny_sd3, cfg)
    export_lora(tmp_path, lora_state_dict(old), cfg)
    found = read_lora_file(tmp_path)
    assert (found.path, found.kind, found.rank, found.alpha) == (tmp_path / LORA_FILE, kind, 4, 4.0)
    assert len(found.modules) == 2 * 8 - 1  # the last block has no to_add_out (context_pre_only)

    new = load_transformer(tiny_sd3)
    add_lora(new, cfg.model_copy(update={"targets": found.modules}), seed=7)  # another init: the load must fix it
    assert not torch.equal(_output(new), _output(old))
    load_lora_file(new, read_lora_file(tmp_path / LORA_FILE))
    assert torch.equal(_output(new), _output(old))
    g = torch.Generator().manual_seed(3)
    batches = [{"latents": torch.randn(2, 16, 8, 8, generator=g), "prompt_embeds": torch.randn(2, 154, 96, generator=g),
                "pooled": torch.randn(2, 80, generator=g)}]
    losses = [eval_loss(m, batches, FlowConfig(), torch.device("cpu"), torch.float32, batch_size=2) for m in (old, new)]
    assert losses[0] == losses[1]


def test_other_layouts_read_as_diffusers_reads_them(tiny_sd3, tmp_path):
    """A peft save (base_model.model. prefix, no header: alpha = rank, as diffusers loads it) and a file with
    kohya-style `.alpha` tensors: the same tensors under peft's names, and the alpha each means."""
    cfg = LoraConfig(rank=4)
    tensors = lora_state_dict(_trained(tiny_sd3, cfg))
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, str(tmp_path / "peft.safetensors"))
    peft_file = read_lora_file(tmp_path / "peft.safetensors")
    assert peft_file.alpha == 4.0 and peft_file.kind == "lora"
    assert all(torch.equal(peft_file.tensors[k], v) for k, v in tensors.items()) and peft_file.tensors.keys() == tensors.keys()
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    save_file({**{f"transformer.{k}": v for k, v in tensors.items()},
               **{f"transformer.{m}.alpha": torch.tensor(8.0) for m in modules}}, str(tmp_path / "alphas.safetensors"))
    assert read_lora_file(tmp_path / "alphas.safetensors").alpha == 8.0


def _job_with(tmp_path: Path, location: Path, *overrides: str):
    return load_job(TINY, [f"output_dir={tmp_path / 'out'}", f"lora.init_from={location}", *overrides])


def test_the_job_takes_the_files_settings_and_refuses_others_naming_both(tiny_sd3, tmp_path):
    cfg = LoraConfig(rank=4, targets="attention", kind="dora")
    export_lora(tmp_path / "old", lora_state_dict(_trained(tiny_sd3, cfg)), cfg)
    raw = {"output_dir": str(tmp_path / "out"), "model": {"pretrained": "tiny-sd3"},
           "data": {"datasets": [{"id": "d", "type": "demo", "instance_data_dir": str(tmp_path / "demo")}]},
           "lora": {"init_from": str(tmp_path / "old")}}
    job = load_job(raw=raw)
    check_paths(job)  # names no rank, alpha, targets or kind: the file's are taken
    assert (job.lora.kind, job.lora.rank, job.lora.alpha, job.lora.blocks) == ("dora", 4, 4.0, None)
    assert len(job.lora.targets) == 8 and "transformer_blocks.1.attn.to_out.0" in job.lora.targets
    assert load_job(raw={**raw, "lora": json.loads(job.lora.model_dump_json())}).lora == job.lora  # job.yaml keeps it

    with pytest.raises(ConfigError) as e:  # jobs/tiny.yaml names rank 8 and targets all
        check_paths(_job_with(tmp_path, tmp_path / "old", "lora.kind=lora", "lora.alpha=16"))
    text = str(e.value)
    assert f"lora.rank: the job says 8, and lora.init_from {tmp_path / 'old' / LORA_FILE} has 4; remove lora.rank" in text
    assert "lora.kind: the job says lora, and lora.init_from" in text and "has dora" in text
    assert "lora.alpha: the job says 16, and lora.init_from" in text and "has 4 (raytune_sd3's files fold" in text
    assert "lora.targets: the job's targets 'all' (blocks None) select 21 layers, and lora.init_from" in text
    with pytest.raises(ConfigError, match="is a dora, and lora.kind dora with train.strategy zero3 cannot train"):
        check_paths(load_job(raw={**raw, "train": {"strategy": "zero3"}}))


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 32)},
     "kohya sd-scripts' MMDiT layout"),
    ({"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(4, 4)},
     "a LyCORIS adapter: lora.init_from continues a LoRA or DoRA only"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
     "also adapts the text encoders"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
      "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
     r"adapts layers that tiny-sd3 lacks \(e.g. \['single_transformer_blocks.0.attn.to_q'\]\): a LoRA of another"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
      "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(2, 32),
      "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(32, 2)}, r"different ranks \[2, 4\]"),
    ({"transformer.transformer_blocks.0.norm1.linear.weight": torch.zeros(4, 4)}, "are not LoRA weights"),
])
def test_files_that_cannot_start_a_run_are_refused_at_the_door(tmp_path, keys, message):
    save_file(keys, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match=f"lora.init_from: .*{message}"):
        check_paths(_job_with(tmp_path, tmp_path / "x.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="lora.init_from: .*junk.safetensors is not a readable .safetensors file"):
        check_paths(_job_with(tmp_path, tmp_path / "junk.safetensors"))
    with pytest.raises(ConfigError, match="lora.init_from: .*nowhere is not a file or folder"):
        check_paths(_job_with(tmp_path, tmp_path / "nowhere"))


def test_combinations_refused_by_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="lora.kind dora with train.strategy zero3 cannot train: DoRA reads"):
        load_job(TINY, ["lora.kind=dora", "train.strategy=zero3"])
    with pytest.raises(ConfigError, match=r"lora.kind: .*'lora', 'dora', 'lokr' or 'loha'"):
        load_job(TINY, ["lora.kind=lokx"])
    with pytest.raises(ConfigError, match="tune searches lora.rank, which lora.init_from takes from its file"):
        load_job(TINY, [f"lora.init_from={tmp_path}", "tune.num_trials=2", "tune.space={lora.rank: {choice: [4, 8]}}"])
