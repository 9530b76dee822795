"""W&B: the config a run sends has the secrets of the environment stripped (a real offline wandb run)."""

from pathlib import Path

from raytune_sd3.config import load_job
from raytune_sd3.train.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
WANDB_KEY, HF_TOKEN = "wandb-key-in-a-config-value-0123456789", "hf_tokenInAConfigValue0123456789abcdef"


def test_wandb_config_has_the_secrets_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    # Secrets where the code must strip them: a value equal to one (a token pasted into the wrong key), and one
    # inside a longer string. Neither changes what a run on the tiny local model does (revision is for hub ids).
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", "wandb.project=raytune-sd3-tests", "wandb.mode=offline",
        f"model.revision={HF_TOKEN}", f"data.cache_dir={tmp_path / 'cache'}?note={WANDB_KEY}"])
    cfg.output_dir.mkdir()  # as the driver does before the workers start
    tracker = Tracker(cfg, active=True)
    sent = dict(tracker.run.config)
    tracker.log({"step": 1, "loss": 0.5})
    tracker.finish()

    assert sent["model"]["revision"] == "<redacted>"
    assert sent["data"]["cache_dir"] == f"{tmp_path / 'cache'}?note=<redacted>"
    assert sent["train"]["learning_rate"] == cfg.train.learning_rate and "tune" not in sent  # the rest as it is
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), files  # the offline run was written...
    leaked = [p.name for p in files if WANDB_KEY.encode() in p.read_bytes() or HF_TOKEN.encode() in p.read_bytes()]
    assert not leaked  # ...without either secret (its debug log and transaction log hold the config)
