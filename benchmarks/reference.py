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
    p.add_argument("manifest", type=Path, help="the cache manifest the job trains on (output_dir/manifest.parquet)")
    p.add_argument("pretrained", help="the diffusers folder of the model")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (match one Ray Train worker's)")
    p.add_argument("--nice", type=int, default=0, help="run at this niceness (match the Ray worker's)")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the step times")
    return p.parse_args(argv)


class ReferenceLoop:
    """The bare loop's state (model, LoRA, AdamW, schedulers, the cached samples in memory) and its step. step.py
    builds one inside our Ray Train worker and runs one reference step before each of ours, so that both are timed
    on the same thread, core and moment; main() below runs it alone."""

    def __init__(self, job: dict, manifest_path: Path, pretrained: str):
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from safetensors.torch import load_file

        from raytune_sd3.models.lora import PRESETS  # the target names only: the same modules get LoRA

        lora, train = job["lora"], job["train"]
        self.dtype = dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["model"]["dtype"]]
        self.max_grad_norm = train["max_grad_norm"]
        transformer = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", torch_dtype=dtype)
        transformer.requires_grad_(False)
        targets = PRESETS[lora["targets"]] if isinstance(lora["targets"], str) else lora["targets"]
        transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"] or lora["rank"],
                                           init_lora_weights="gaussian", target_modules=targets))
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        for p in self.params:  # the script's cast_training_params: LoRA weights in fp32
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=train["learning_rate"],
                                           betas=(train["adam_beta1"], train["adam_beta2"]),
                                           weight_decay=train["weight_decay"], eps=train["adam_epsilon"])
        self.lr_scheduler = get_scheduler(train["lr_scheduler"], self.optimizer,
                                          num_warmup_steps=train["lr_warmup_steps"],
                                          num_training_steps=train["max_steps"])
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler")

        from raytune_sd3.data.manifest import read_manifest  # parquet (or an earlier version's JSON)

        manifest = read_manifest(manifest_path)
        root = Path(manifest["cache_dir"])

        def entry(kind: str, key: str) -> dict:
            return load_file(root / kind / key[:2] / f"{key}.safetensors")

        self.samples = [(entry("latents", r["latent_key"])["latents"], entry("text", r["text_key"]))
                        for r in manifest["rows"]]
        self.batch_size = train["batch_size"]
        self.transformer = transformer.train()
        self.steps_done = 0

    def _sigmas(self, timesteps, n_dim: int):  # the script's get_sigmas
        schedule = self.noise_scheduler.timesteps
        step_indices = [(schedule == t).nonzero().item() for t in timesteps]
        sigma = self.noise_scheduler.sigmas[step_indices].flatten().to(self.dtype)
        return sigma.view(-1, *([1] * (n_dim - 1)))

    def step(self) -> float:
        """One training step as the script does it; returns the loss (read with .item(), as its progress bar)."""
        import torch
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        bsz, dtype, first = self.batch_size, self.dtype, self.steps_done * self.batch_size
        batch = [self.samples[(first + i) % len(self.samples)] for i in range(bsz)]
        model_input = torch.stack([lat for lat, _ in batch]).to(dtype)
        prompt_embeds = torch.stack([t["prompt_embeds"] for _, t in batch]).to(dtype)
        pooled = torch.stack([t["pooled"] for _, t in batch]).to(dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling("logit_normal", bsz, logit_mean=0.0, logit_std=1.0)
        indices = (u * self.noise_scheduler.config.num_train_timesteps).long()
        timesteps = self.noise_scheduler.timesteps[indices]
        sigmas = self._sigmas(timesteps, model_input.ndim)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        pred = self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                pooled_projections=pooled, return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3("none", sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss.detach().item()  # the script logs the loss every step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, as Ray does for its workers
    os.nice(max(0, args.nice - os.nice(0)))
    import torch

    torch.set_num_threads(args.threads)
    ref = ReferenceLoop(json.loads(args.job.read_text()), args.manifest, args.pretrained)
    times, cpu_times, first_step_done = [], [], None
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        ref.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        first_step_done = first_step_done or time.time()
    args.out.write_text(json.dumps({"step_s": times, "step_cpu_s": cpu_times, "first_step_done": first_step_done,
                                    "threads": torch.get_num_threads(), "nice": os.nice(0),
                                    "lora_numel": sum(p.numel() for p in ref.params)}))


if __name__ == "__main__":
    main()
