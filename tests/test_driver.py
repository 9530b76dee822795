"""The driver of `python -m raytune_sd3.train` at unit level: the TorchTrainer it builds (not fitted) and the guard
that resumes, refuses or (--restart) discards an earlier run in output_dir."""

import json
from pathlib import Path

import pytest

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.resume import guard_resume
from raytune_sd3.driver.training import build_trainer
from raytune_sd3.run_layout import SETTINGS as SETTINGS_FILE
from raytune_sd3.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_keeps_the_configured_checkpoints_and_failures(tmp_path):
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path / 'run'}", "train.keep_checkpoints=3",
                                                   "train.max_failures=4", "train.num_workers=2"])
    trainer = build_trainer(cfg, tmp_path / "manifest.parquet", str(tmp_path / "model"))
    run = trainer.run_config
    assert run.checkpoint_config.num_to_keep == 3 and run.failure_config.max_failures == 4
    assert run.name == "run" and Path(run.storage_path) == tmp_path / "run" / "ray"
    # The folder the workers look in for checkpoints Ray Train has not registered yet is Ray Train's run folder,
    # the one the resume guard keeps its settings in (one computation: run_layout.py).
    assert Path(trainer.train_loop_config["run_dir"]) == tmp_path / "run" / "ray" / "run" == RunLayout.of(cfg).run_dir
    assert trainer.scaling_config.num_workers == 2


def test_rerun_resumes_refuses_other_settings_and_restart_discards(tmp_path):
    tiny, out = ROOT / "jobs" / "tiny.yaml", f"output_dir={tmp_path / 'run'}"
    run_dir = tmp_path / "run" / "ray" / "run"
    guard_resume(load_job(tiny, [out]), restart=False)
    (run_dir / "checkpoint_000001").mkdir()  # what the first run left
    guard_resume(load_job(tiny, [out, "train.max_steps=80"]), restart=False)  # a longer run resumes it
    assert (run_dir / "checkpoint_000001").is_dir()

    other = load_job(tiny, [out, "train.learning_rate=3e-3"])
    with pytest.raises(ConfigError, match=r"other settings[\s\S]*train\.learning_rate: 0\.01 -> 0\.003[\s\S]*--restart"):
        guard_resume(other, restart=False)
    assert (run_dir / "checkpoint_000001").is_dir()  # refused: nothing touched
    guard_resume(other, restart=True)
    assert not (run_dir / "checkpoint_000001").exists()  # the old run is gone; the new settings are the run's
    assert json.loads((run_dir / SETTINGS_FILE).read_text())["train"]["learning_rate"] == 3e-3


def test_a_finished_run_is_found_without_ray(tmp_path):
    """finished_run: the same job rerun after its run ended at train.max_steps (its LoRA copied out) is found from
    the files alone: job.yaml (its `auto`s as the run resolved them), the settings record and the newest complete
    checkpoint. A run stopped earlier, a longer max_steps, other settings, a last checkpoint not whole, or no LoRA:
    not finished (the normal path decides). A key a resumed run may change does not matter."""
    from raytune_sd3.config import dump_job
    from raytune_sd3.driver.placement import Cluster, resolve_auto
    from raytune_sd3.driver.resume import finished_run, validation_changes
    from raytune_sd3.run_layout import LORA as LORA_FILE
    from raytune_sd3.run_layout import RunLayout
    from raytune_sd3.train.checkpoint import file_sizes, write_record

    out = tmp_path / "run"

    def job(*overrides: str):
        return load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={out}", *overrides])

    ran = job()
    resolve_auto(ran, Cluster(({"CPU": 4.0},)))  # as the run did on its cluster, before writing job.yaml
    guard_resume(ran, restart=False)
    (out / "job.yaml").write_text(dump_job(ran))
    steps = ran.train.max_steps

    def checkpoint(index: int, step: int) -> Path:
        folder = RunLayout.of(ran).run_dir / f"checkpoint_{index:06d}"
        folder.mkdir()
        (folder / "train_state.pt").write_bytes(b"s" * step)
        write_record(folder, step, file_sizes(folder))
        return folder

    checkpoint(0, steps // 2)
    lora = out / LORA_FILE
    lora.write_bytes(b"the LoRA")
    assert finished_run(job()) is None  # stopped half-way
    last = checkpoint(1, steps)
    assert finished_run(job()) == (steps, lora)
    assert finished_run(job("train.checkpoint_every=3", "train.max_failures=5")) == (steps, lora)
    assert finished_run(job(f"train.max_steps={steps + 10}")) is None  # trains on
    assert finished_run(job("train.learning_rate=3e-3")) is None  # another run: guard_resume refuses it
    # a run with a webhook recorded its URL redacted (a redacted URL does not validate): still found, and its
    # rerun with the URL given again sees no validation change
    hooked = "validation.webhook_url=https://discord.com/api/webhooks/1/secret-token"
    hooked_run = job(hooked)
    resolve_auto(hooked_run, Cluster(({"CPU": 4.0},)))
    (out / "job.yaml").write_text(dump_job(hooked_run))
    assert "webhook_url: <redacted>" in (out / "job.yaml").read_text()
    assert finished_run(job(hooked)) == (steps, lora) and validation_changes(job(hooked)) == []
    (out / "job.yaml").write_text(dump_job(ran))
    (last / "train_state.pt").write_bytes(b"s")  # the last checkpoint not whole: the newest whole one is earlier
    assert finished_run(job()) is None
    (last / "train_state.pt").write_bytes(b"s" * steps)
    lora.unlink()
    assert finished_run(job()) is None


def test_run_settings_file_has_no_secret(tmp_path, monkeypatch):
    """The settings file beside the checkpoints (and the refusal that quotes it) strip a secret of the
    environment that a config value holds, as job.yaml does."""
    secret = "hf_settingsSecret0123456789abcdefghij"
    monkeypatch.setenv("HF_TOKEN", secret)
    tiny, out = ROOT / "jobs" / "tiny.yaml", f"output_dir={tmp_path / 'run'}"
    guard_resume(load_job(tiny, [out, f"model.revision={secret}"]), restart=False)
    settings = (tmp_path / "run" / "ray" / "run" / SETTINGS_FILE).read_text()
    assert secret not in settings and json.loads(settings)["model"]["revision"] == "<redacted>"
    (tmp_path / "run" / "ray" / "run" / "checkpoint_000001").mkdir()  # a run to resume: other settings refused
    with pytest.raises(ConfigError, match=r"model\.revision: '<redacted>' -> another value") as refused:
        guard_resume(load_job(tiny, [out, "model.revision=main"]), restart=False)
    assert secret not in str(refused.value)
    # A secret known only by its environment variable (a W&B key looks like any hex string), rerun from a shell
    # without that variable: the refusal must not print it either.
    key, out2 = "0123456789abcdef0123456789abcdef01234567", f"output_dir={tmp_path / 'run2'}"
    monkeypatch.setenv("WANDB_API_KEY", key)
    guard_resume(load_job(tiny, [out2, f"model.revision={key}"]), restart=False)
    (tmp_path / "run2" / "ray" / "run2" / "checkpoint_000001").mkdir()
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(ConfigError, match=r"model\.revision: '<redacted>' -> another value") as refused:
        guard_resume(load_job(tiny, [out2, f"model.revision={key}"]), restart=False)
    assert key not in str(refused.value)


def test_a_run_that_left_no_checkpoint_restarts_with_the_fixed_job(tmp_path):
    """A first attempt that failed before its first checkpoint leaves only its settings: the fixed job (other
    settings) starts over without --restart; once a checkpoint exists, the same change is refused as before."""
    tiny, out = ROOT / "jobs" / "tiny.yaml", f"output_dir={tmp_path / 'run'}"
    run_dir = tmp_path / "run" / "ray" / "run"
    guard_resume(load_job(tiny, [out, "train.batch_size=64"]), restart=False)  # failed: nothing to resume
    guard_resume(load_job(tiny, [out]), restart=False)
    assert json.loads((run_dir / SETTINGS_FILE).read_text())["train"]["batch_size"] == 4
    (run_dir / "checkpoint_000001").mkdir()
    with pytest.raises(ConfigError, match=r"train\.batch_size: 4 -> 64"):
        guard_resume(load_job(tiny, [out, "train.batch_size=64"]), restart=False)


def test_validation_changes_are_named_against_the_finished_runs_job(tmp_path):
    from raytune_sd3.config import dump_job
    from raytune_sd3.driver.resume import validation_changes

    tiny, out = ROOT / "jobs" / "tiny.yaml", f"output_dir={tmp_path / 'run'}"
    assert validation_changes(load_job(tiny, [out])) == []  # no finished run: nothing to compare with
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.yaml").write_text(dump_job(load_job(tiny, [out])))
    assert validation_changes(load_job(tiny, [out, "train.learning_rate=3e-3"])) == []
    assert validation_changes(load_job(tiny, [out, "validation.clip_score=true", "validation.guidance=5"])) == [
        "validation.guidance: 3.0 -> 5.0", "validation.clip_score: False -> True"]


def test_success_sets_an_earlier_error_log_aside(tmp_path):
    from raytune_sd3.driver.training import set_aside_error_log

    (tmp_path / "error.log").write_text("RuntimeError: the first attempt")
    set_aside_error_log(tmp_path)
    assert not (tmp_path / "error.log").exists()
    assert (tmp_path / "error.previous.log").read_text() == "RuntimeError: the first attempt"
    set_aside_error_log(tmp_path)  # nothing to move: no error


@pytest.mark.parametrize("module", ["train.__main__", "tune.__main__", "cache", "check", "hub.__main__", "convert.__main__"])
def test_every_command_parser_redacts_and_declares_its_own_options(module, capsys):
    """All six commands build their parser with driver/cli.py: argparse's own error quotes the command line with
    URL credentials stripped; the job commands share JOB, --set, --data, --verbose, the others have their own."""
    import importlib

    main = importlib.import_module(f"raytune_sd3.{module}").main
    args = ["simpletuner", "a", "b", "-o", "c"] if module == "convert.__main__" else ["job.yaml"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--nope=s3://me:pa55w0rd-in-url@bucket/x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unrecognized arguments" in err and "pa55w0rd-in-url" not in err, err
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out.split()
    on_a_job = module.split(".")[0] in {"train", "tune", "cache", "check"}
    assert all(option in shown for option in ("--set", "--data", "--verbose")) == on_a_job, shown


def test_a_run_recorded_before_a_key_existed_resumes_with_its_default(tmp_path):
    """A key added to the schema after a run started (data.random_flip, validation.num_images) is read as its
    default in that run's records: the rerun resumes and is not revalidated, where a value other than the default
    still counts as a change."""
    from raytune_sd3.driver.resume import validation_changes

    tiny, out = ROOT / "jobs" / "tiny.yaml", f"output_dir={tmp_path / 'run'}"
    run_dir = tmp_path / "run" / "ray" / "run"
    guard_resume(load_job(tiny, [out]), restart=False)
    (run_dir / "checkpoint_000001").mkdir()
    settings = json.loads((run_dir / SETTINGS_FILE).read_text())
    del settings["data"]["random_flip"]  # as written before the key existed
    (run_dir / SETTINGS_FILE).write_text(json.dumps(settings))
    guard_resume(load_job(tiny, [out]), restart=False)
    with pytest.raises(ConfigError, match=r"data\.random_flip: False -> True"):
        guard_resume(load_job(tiny, [out, "data.random_flip=true"]), restart=False)

    from raytune_sd3.config import dump_job

    cfg = load_job(tiny, [out])
    saved = dump_job(cfg).replace("  num_images: 1\n", "")
    assert saved != dump_job(cfg)
    (tmp_path / "run" / "job.yaml").write_text(saved)
    assert validation_changes(cfg) == []
    assert validation_changes(load_job(tiny, [out, "validation.num_images=2"])) == ["validation.num_images: 1 -> 2"]
