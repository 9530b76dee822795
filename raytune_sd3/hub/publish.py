"""The model card of a trained LoRA (output_dir/README.md, with the last validation images copied beside it into
output_dir/images/) and its upload to the Hugging Face Hub. After training, `train` writes the card whether or not
`hub.repo_id` is set, then uploads the card, the images and pytorch_lora_weights.safetensors there (private by
default). `python -m raytune_sd3.hub` (hub/__main__.py) writes the card and uploads again by hand, e.g. after a
failed upload.

The token is HF_TOKEN from the environment, never the job file. An upload that fails loses nothing: the LoRA and
the card stay in output_dir, one warning names what failed and the command to retry, and `train` exits with status 4
(trained, not uploaded), so a script can tell it from a finished upload (0) and from a failed training (1).
Exit status of the command: 0 uploaded (or card written, with no repo to upload to), 2 nothing to do it with (no
job.yaml, no repo id, no HF_TOKEN), 4 the upload failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from raytune_sd3 import atomic
from raytune_sd3.config import HF_TOKEN_ENV, LYCORIS_KINDS, TINY_MODELS, JobConfig, dump_job, model_is_path, redact
from raytune_sd3.run_layout import CARD, CARD_IMAGES, LORA, RunLayout

log = logging.getLogger("raytune_sd3")

UPLOADED = [CARD, LORA, f"{CARD_IMAGES}/*"]
EXIT_UPLOAD_FAILED = 4

# The base models' licences as their model cards give them (all SD3 / SD3.5 weights: the Stability AI Community
# License); other models: their own card's front matter when it is on disk, else none is claimed.
STABILITY_COMMUNITY = {"license": "other", "license_name": "stabilityai-ai-community"}
KNOWN_LICENCES = {
    repo: {**STABILITY_COMMUNITY, "license_link": f"https://huggingface.co/{repo}/blob/main/LICENSE.md"}
    for repo in ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo",
                 "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3-medium")
}
KNOWN_LICENCES["stabilityai/stable-diffusion-3-medium-diffusers"] = KNOWN_LICENCES[
    "stabilityai/stable-diffusion-3-medium"]


def token_problem(cfg: JobConfig) -> str | None:
    """Why the upload after training could not authenticate (checked before Ray starts), or None."""
    if cfg.hub.repo_id is None or cfg.tune is not None or os.environ.get(HF_TOKEN_ENV):  # a study uploads nothing
        return None
    return (f"hub.repo_id is set ({cfg.hub.repo_id}), but {HF_TOKEN_ENV} is not in the environment: export "
            f"{HF_TOKEN_ENV} with a write token (https://huggingface.co/settings/tokens) where the job's driver runs, "
            "or remove hub.repo_id (the model card is written to output_dir either way)")


# --- the card -------------------------------------------------------------------------------------------------


def base_model_licence(pretrained: str) -> dict[str, str]:
    """license / license_name / license_link of the base model: its own card on disk (a local folder or the HF
    cache), else the table of SD3 models, else {} (unknown: the card then points at the base model)."""
    card = None
    if model_is_path(pretrained):
        card = Path(pretrained) / CARD
    elif pretrained not in TINY_MODELS:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, CARD)
            card = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a repo id: no cached card
            card = None
    if card is not None and card.is_file():
        meta = front_matter(card.read_text(errors="replace"))
        found = {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
        if found:
            return found
    return dict(KNOWN_LICENCES.get(pretrained, {}))


def front_matter(text: str) -> dict:
    """The metadata of a model card's text, as huggingface_hub reads it ({} without, or when it is not YAML)."""
    if not text.startswith("---"):  # no metadata block (ModelCard would log a warning saying so)
        return {}
    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except ValueError:  # YAML that is not a mapping: a card we cannot read claims nothing
        return {}


def trigger_of(cfg: JobConfig) -> str | None:
    """hub.trigger, else the instance prompt(s) of the training (not regularisation) data sets."""
    if cfg.hub.trigger:
        return cfg.hub.trigger
    prompts = [d.instance_prompt for d in cfg.data.datasets if d.instance_prompt and not d.is_regularisation_data]
    return ", ".join(dict.fromkeys(prompts)) or None


def copy_validation_images(cfg: JobConfig, out: Path) -> list[tuple[str, str]]:
    """The last validation step's PNGs copied to out/images/ (replacing earlier copies); returns (relative path,
    prompt) per image. validation/step_N/NN_WxH.png is prompt NN at WxH."""
    layout = RunLayout(out)
    steps = layout.validation_steps()
    pngs = sorted(steps[-1].glob("*.png")) if steps else []
    shown = []
    for png in pngs:
        index = png.stem.partition("_")[0]
        prompt = cfg.validation.prompts[int(index)] if index.isdigit() and int(index) < len(
            cfg.validation.prompts) else png.stem
        shown.append((f"{CARD_IMAGES}/{png.name}", prompt))

    def copy(folder: Path) -> None:
        for png in pngs:
            shutil.copyfile(png, folder / png.name)

    atomic.write_folder(layout.card_images, copy)
    return shown


def snippet_base(base: str) -> tuple[str, list[str]]:
    """How the card's snippet names the base model: (Python expression, lines before it). A hub id as it is; a
    folder in the HF cache by the hub id it was downloaded as; the tiny test models through raytune_sd3, which
    builds them; another folder by its path, said to be one."""
    if base in TINY_MODELS:
        return (f"resolve_pretrained({json.dumps(base)})",
                ["from raytune_sd3.testmodels.resolve import resolve_pretrained  # builds the tiny test model offline"])
    if model_is_path(base):
        parts = Path(base).parts
        cached = next((p for p in parts if p.startswith("models--")), None)
        if cached and "snapshots" in parts:  # <HF cache>/models--owner--name/snapshots/<revision>
            return json.dumps(cached.removeprefix("models--").replace("--", "/")), []
        return json.dumps(base), ["# the base model this LoRA was trained on: a local folder on the training machine"]
    return json.dumps(base), []


def model_card(cfg: JobConfig, images: list[tuple[str, str]], steps: int | None = None) -> str:
    """The card's text: YAML front matter (base model, licence, tags, widget) and what the LoRA is, how to load it,
    its validation images and the training settings (the redacted job.yaml). Secrets are stripped from all of it."""
    base = cfg.model.pretrained
    hub_base = base if not model_is_path(base) and base not in TINY_MODELS else None
    licence = base_model_licence(base)
    family = ["sd3.5", "sd3.5-diffusers"] if "3.5" in base or base == "tiny-sd35" else ["sd3", "sd3-diffusers"]
    trigger = trigger_of(cfg)
    lycoris = cfg.lora.kind in LYCORIS_KINDS
    meta = ModelCardData(
        base_model=hub_base, library_name="diffusers", pipeline_tag="text-to-image",
        tags=list(dict.fromkeys(["text-to-image", "diffusers", "lora", "sd3", *family, "template:sd-lora",
                                 *(["lycoris", cfg.lora.kind] if lycoris else []), "raytune_sd3"])),
        **licence,  # license, license_name, license_link: those known, none claimed otherwise
        instance_prompt=trigger,  # the Hub's LoRA widget fields (ModelCardData keeps extra keys as given)
        widget=[{"text": prompt, "output": {"url": path}} for path, prompt in images] or None)

    name = cfg.hub.repo_id or cfg.run_name
    t = cfg.train
    where = cfg.hub.repo_id or "path/to/this/folder"
    batch = (f"global batch {t.global_batch}" if t.num_workers != "auto" else f"batch {t.batch_size} per worker")
    what = f"A LyCORIS {'LoKr' if cfg.lora.kind == 'lokr' else 'LoHa'}" if lycoris else "A LoRA"
    lines = [f"# {name}", "",
             f"{what} for [{base}](https://huggingface.co/{base})" if hub_base else f"{what} for `{base}`",
             f"trained with raytune_sd3 for {steps if steps is not None else t.max_steps} steps (rank "
             f"{cfg.lora.rank} on `{cfg.lora.targets}`, {batch}, learning rate {t.learning_rate:g}, flow shift "
             f"{cfg.flow.shift}" + (f", on a {cfg.model.quantize}-quantised base; it loads into the unquantised "
                                    "pipeline" if cfg.model.quantize != "none" else "") + ").", ""]
    lines += ([f"**Trigger:** `{trigger}`: use it in your prompts.", ""] if trigger else
              ["**Trigger:** none; it was trained on captions (caption_strategy "
               f"{', '.join(sorted({d.caption_strategy for d in cfg.data.datasets}))}).", ""])
    load_base, base_note = snippet_base(base)
    lines += ["## Use it", "", "```python", "import torch", "from diffusers import StableDiffusion3Pipeline",
              *base_note, "",
              f"pipe = StableDiffusion3Pipeline.from_pretrained({load_base}, torch_dtype=torch.bfloat16)"
              '.to("cuda")',
              *(_lycoris_load(cfg, where) if lycoris else [f"pipe.load_lora_weights({json.dumps(where)})  # {LORA}"]),
              f"image = pipe({json.dumps(trigger or (cfg.validation.prompts or ['a photo'])[0])}, "
              f"num_inference_steps={cfg.validation.steps}, guidance_scale={cfg.validation.guidance:g}).images[0]",
              "```", ""]
    if images:
        lines += ["## Validation images", "", f"Sampled with the LoRA at the end of training ({cfg.validation.steps}"
                  f" steps, guidance {cfg.validation.guidance:g}"
                  + (f", skip-layer guidance on blocks {cfg.validation.skip_layers}" if cfg.validation.skip_layers
                     else "") + "):", ""]
        lines += [f"![{_alt(prompt)}]({path})  \n*{_alt(prompt)}*\n" for path, prompt in images]
    lines += ["## Licence", ""]
    if licence.get("license_link"):
        lines += [f"The base model's licence applies: [{licence.get('license_name', licence['license'])}]"
                  f"({licence['license_link']}).", ""]
    elif licence:
        lines += [f"The base model's licence applies: {licence.get('license_name', licence['license'])}.", ""]
    else:
        lines += [f"The licence of the base model (`{base}`) applies; see its model card.", ""]
    lines += ["## Training settings", "", "The job file it was trained with (secrets removed; it runs as a job "
              "file itself: `python -m raytune_sd3.train job.yaml`):", "", "```yaml", dump_job(cfg).rstrip(), "```",
              ""]
    card = ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines))  # None-valued keys are left out
    return redact(str(card))  # prompts and settings may carry a token or URL credentials: none leaves


def _lycoris_load(cfg: JobConfig, where: str) -> list[str]:
    """The snippet's lines that put a LoKr / LoHa into `pipe`: LyCORIS's own loader (diffusers' load_lora_weights
    does not read LyCORIS's layout; ComfyUI and Forge load the file as it is)."""
    file = (f"hf_hub_download({json.dumps(cfg.hub.repo_id)}, {json.dumps(LORA)})" if cfg.hub.repo_id
            else json.dumps(f"{where}/{LORA}"))
    return [*(["from huggingface_hub import hf_hub_download"] if cfg.hub.repo_id else []),
            "from lycoris import create_lycoris_from_weights  # pip install lycoris-lora",
            f"network, _ = create_lycoris_from_weights(1.0, {file}, pipe.transformer)",
            "network.merge_to()  # the LyCORIS update, added into the transformer's weights"]


def trained_steps(out: Path) -> int | None:
    """The step of the last line of out/metrics.jsonl (None without one)."""
    path = RunLayout(out).metrics
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]).get("step") if lines else None


def _alt(prompt: str) -> str:
    """A prompt as Markdown text on one line: brackets, asterisks and line breaks would end the image link."""
    return re.sub(r"([\[\]*_])", r"\\\1", " ".join(prompt.split()))


def write_model_card(cfg: JobConfig, out: Path, steps: int | None = None) -> Path:
    """out/README.md (atomically) with the last validation images copied to out/images/; returns its path.
    `steps`: the steps trained (default: the last step in out/metrics.jsonl)."""
    images = copy_validation_images(cfg, out)
    steps = steps if steps is not None else trained_steps(out)
    return atomic.write_text(RunLayout(out).card, model_card(cfg, images, steps))


# --- the upload -----------------------------------------------------------------------------------------------


def upload(out: Path, repo_id: str, private: bool, token: str) -> str:
    """Create the repo (if new) and upload the card, images and LoRA of `out` in one commit; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=url.repo_id, folder_path=out, allow_patterns=UPLOADED, repo_type="model",
                      commit_message="raytune_sd3: LoRA, model card and validation images")
    return str(url)


def retry_command(out: Path, repo_id: str) -> str:
    return f"{HF_TOKEN_ENV}=... python -m raytune_sd3.hub {out} --repo-id {repo_id}"


def publish(cfg: JobConfig, out: Path, steps: int | None = None) -> int:
    """After training: write the card, upload when hub.repo_id is set. Never raises: a failure is one warning
    (what failed, and the command to retry). Returns 0, or EXIT_UPLOAD_FAILED when an upload asked for failed."""
    try:
        card = write_model_card(cfg, out, steps)
        log.info("model card: %s", card)
    except Exception as e:  # noqa: BLE001 - the LoRA is already safe in output_dir; the card is a side feature
        log.warning("could not write the model card in %s: %s", out, redact(f"{type(e).__name__}: {e}"))
        if cfg.hub.repo_id is None:
            return 0
    repo = cfg.hub.repo_id
    if repo is None:
        return 0
    token = os.environ.get(HF_TOKEN_ENV)
    try:
        if not token:
            raise RuntimeError(f"{HF_TOKEN_ENV} is not in the environment")
        url = upload(out, repo, cfg.hub.private, token)
    except Exception as e:  # noqa: BLE001 - network, auth, quota: the run's results stay where they are
        first = redact(str(e)).strip().splitlines()
        log.warning("upload to the Hugging Face Hub (%s) failed: %s: %s\n  the LoRA and its model card are safe in "
                    "%s\n  retry: %s", repo, type(e).__name__, first[0] if first else "", out,
                    retry_command(out, repo))
        return EXIT_UPLOAD_FAILED
    log.info("uploaded to %s (%s)", url, "private" if cfg.hub.private else "public")
    return 0
