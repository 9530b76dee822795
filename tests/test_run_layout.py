"""The run layout (raytune_sd3/run_layout.py): one name per file under output_dir, each drawn in the module's map,
and the run folder the same for the trainer, the resume guard and a Tune study."""

from pathlib import Path

from raytune_sd3 import run_layout
from raytune_sd3.config import load_job
from raytune_sd3.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def _names() -> dict[str, str]:
    return {k: v for k, v in vars(run_layout).items() if k.isupper() and isinstance(v, str)}


def test_every_name_is_in_the_map_and_names_one_file():
    names = _names()
    aliases = {run_layout.LORA, run_layout.EMA_LORA}  # CHECKPOINT_LORA is LORA and CHECKPOINT_EMA_LORA is EMA_LORA, on purpose
    assert len(set(names.values()) - aliases) == len(names) - 2 * len(aliases)
    missing = [k for k, v in names.items() if v.split("*")[0].rstrip("_") not in run_layout.__doc__]
    assert not missing, f"add these to run_layout.py's map: {missing}"


def test_the_paths_of_a_run(tmp_path):
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path / 'out'}", "name=first"])
    layout = RunLayout.of(cfg)
    out = tmp_path / "out"
    assert (layout.job, layout.metrics, layout.lora) == (out / "job.yaml", out / "metrics.jsonl",
                                                         out / "pytorch_lora_weights.safetensors")
    assert layout.run_dir == out / "ray" / "first" and layout.settings.parent == layout.run_dir
    assert layout.validation_images(7) == out / "validation" / "step_000007"
    assert layout.trial("t1") == out / "trials" / "t1"

    from raytune_sd3.tune.study import experiment_path

    assert experiment_path(cfg) == layout.run_dir  # a study keeps its state where a run keeps its checkpoints
    (layout.validation / "step_000010").mkdir(parents=True)
    (layout.validation / "step_000002").mkdir()
    assert [p.name for p in layout.validation_steps()] == ["step_000002", "step_000010"]
