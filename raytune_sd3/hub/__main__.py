"""python -m raytune_sd3.hub OUTPUT_DIR [--repo-id owner/name] [--public]

The model card of a trained LoRA (output_dir/README.md, with the last validation images copied beside it into
output_dir/images/) and its upload to the Hugging Face Hub. After training, `train` writes the card whether or not
`hub.repo_id` is set, then uploads the card, the images and pytorch_lora_weights.safetensors there (private by
default). Run this module to write the card and upload again by hand, e.g. after a failed upload.

The token is HF_TOKEN from the environment, never the job file. An upload that fails loses nothing: the LoRA and
the card stay in output_dir, one warning names what failed and this command, and `train` exits with status 4
(trained, not uploaded), so a script can tell it from a finished upload (0) and from a failed training (1).
Exit status here: 0 uploaded (or card written, with no repo to upload to), 2 nothing to do it with (no job.yaml,
no repo id, no HF_TOKEN), 4 the upload failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.cli import command_parser
from raytune_sd3.driver.console import setup_logging
from raytune_sd3.hub.publish import publish, token_problem
from raytune_sd3.run_layout import LORA, RunLayout


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m raytune_sd3.hub", __doc__)
    p.add_argument("output_dir", help="a finished run's output_dir (holding job.yaml and the LoRA)")
    p.add_argument("--repo-id", help="owner/name on the Hub (default: the job's hub.repo_id)")
    p.add_argument("--public", action="store_true", help="create a new repo public (default: private)")
    args = p.parse_args(argv)
    setup_logging()  # our lines only: huggingface_hub's HTTP client would log every request
    layout = RunLayout(Path(args.output_dir).resolve())
    overrides = [f"hub.repo_id={args.repo_id}"] if args.repo_id else []
    overrides += ["hub.private=false"] if args.public else []
    if not layout.job.is_file() or not layout.lora.is_file():
        print(f"error: {layout.output_dir} holds no finished run ({layout.job.name} and {LORA})", file=sys.stderr)
        return 2
    try:
        cfg = load_job(layout.job, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.hub.repo_id is None:
        print("error: no repo to upload to: give --repo-id owner/name (or set hub.repo_id in the job)",
              file=sys.stderr)
        return 2
    if (problem := token_problem(cfg)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return publish(cfg, layout.output_dir)


if __name__ == "__main__":
    sys.exit(main())
