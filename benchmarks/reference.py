"""The reference the step and overhead benchmarks compare against: a bare LoRA training loop in one process, written
the way diffusers' `train_dreambooth_lora_sd3.py` does a step (plain PyTorch + diffusers + peft, no Ray).

Same model, LoRA targets and rank, batch, resolution, T5 length, AdamW, LR schedule and clipping as the job it is
given; the cached latents and embeddings are loaded into memory first (the script's --cache_latents and precomputed
prompt embeddings). Per step, as in the script:
    u ~ logit-normal; t = scheduler.timesteps[u * 1000]; sigma = scheduler.sigmas[t]
    noisy = (1 - sigma) * latents + sigma * noise;  pred = transformer(noisy, t, prompt_embeds, pooled)
    loss = mean(weighting * (pred - (noise - latents))^2);  backward; clip_grad_norm_; AdamW; LR step; zero_grad
    loss.item() for the progress bar

    python benchmarks/reference.py JOB.json MANIFEST PRETRAINED --steps 50 --threads 1 --out times.json
(normally started by step.py and overhead.py; JOB.json is a resolved job, `JobConfig.model_dump(mode="json")`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", type=Path, help="the resolved job as JSON")
    p.add_argument("manifest", type=Path, help="the cache manifest the job trains on (output_dir/manifest.json)")
    p.add_argument("pretrained", help="the diffusers folder of the model")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (match one Ray Train worker's)")
    p.add_argument("--nice", type=int, default=0, help="run at this niceness (match the Ray worker's)")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the step times")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, as Ray does for its workers
    os.nice(max(0, args.nice - os.nice(0)))
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from safetensors.torch import load_file

    from raytune_sd3.models.lora import PRESETS  # the target names only: the same modules get LoRA

    torch.set_num_threads(args.threads)
    job = json.loads(args.job.read_text())
    lora, train = job["lora"], job["train"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["model"]["dtype"]]

    transformer = SD3Transformer2DModel.from_pretrained(args.pretrained, subfolder="transformer", torch_dtype=dtype)
    transformer.requires_grad_(False)
    targets = PRESETS[lora["targets"]] if isinstance(lora["targets"], str) else lora["targets"]
    transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"] or lora["rank"],
                                       init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # the script's cast_training_params: LoRA weights in fp32
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=train["learning_rate"], betas=(train["adam_beta1"], train["adam_beta2"]),
                                  weight_decay=train["weight_decay"], eps=train["adam_epsilon"])
    lr_scheduler = get_scheduler(train["lr_scheduler"], optimizer, num_warmup_steps=train["lr_warmup_steps"],
                                 num_training_steps=train["max_steps"])
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained, subfolder="scheduler")

    manifest = json.loads(args.manifest.read_text())
    root = Path(manifest["cache_dir"])

    def entry(kind: str, key: str) -> dict:
        return load_file(root / kind / key[:2] / f"{key}.safetensors")

    samples = [(entry("latents", r["latent_key"])["latents"], entry("text", r["text_key"])) for r in manifest["rows"]]
    bsz = train["batch_size"]

    def get_sigmas(timesteps: torch.Tensor, n_dim: int) -> torch.Tensor:  # as in the script
        schedule = noise_scheduler.timesteps
        step_indices = [(schedule == t).nonzero().item() for t in timesteps]
        sigma = noise_scheduler.sigmas[step_indices].flatten().to(dtype)
        return sigma.view(-1, *([1] * (n_dim - 1)))

    transformer.train()
    times, cpu_times, first_step_done = [], [], None
    for step in range(args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = [samples[(step * bsz + i) % len(samples)] for i in range(bsz)]
        model_input = torch.stack([lat for lat, _ in batch]).to(dtype)
        prompt_embeds = torch.stack([t["prompt_embeds"] for _, t in batch]).to(dtype)
        pooled = torch.stack([t["pooled"] for _, t in batch]).to(dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling("logit_normal", bsz, logit_mean=0.0, logit_std=1.0)
        indices = (u * noise_scheduler.config.num_train_timesteps).long()
        timesteps = noise_scheduler.timesteps[indices]
        sigmas = get_sigmas(timesteps, model_input.ndim)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3("none", sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
        loss.backward()
        if train["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _ = loss.detach().item()  # the script logs the loss every step
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        first_step_done = first_step_done or time.time()
    args.out.write_text(json.dumps({"step_s": times, "step_cpu_s": cpu_times, "first_step_done": first_step_done,
                                    "threads": torch.get_num_threads(), "nice": os.nice(0),
                                    "lora_numel": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
