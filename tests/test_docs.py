"""The README's module map and every job file's header commands hold against the tree, so they cannot drift."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raytune_sd3"


def _module_map() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## How it works"):]
    return block[block.index("```") + 3:block.index("```", block.index("```") + 3)]


def test_the_module_map_names_every_module_and_only_modules_that_exist():
    text = _module_map()
    folders = re.findall(r"^  (\w+)/", text, flags=re.M)
    named = set()
    for line_folder, body in re.findall(r"^  (\w+/)?(.*?)(?=^  \w|\Z)", text, flags=re.M | re.S):
        named |= {f"{line_folder}{m}" for m in re.findall(r"\b([\w]+\.py)\b", body)}
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert set(folders) == {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert named == modules, {"in the map, not in the tree": named - modules, "not in the map": modules - named}


def _header_commands(path: Path) -> list[str]:
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    return re.findall(r"python -m (raytune_sd3[\w.]*) (\S+)", "\n".join(head))


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_headers_run_modules_and_files_that_exist(job):
    commands = _header_commands(job)
    assert commands, f"{job.name}: its header says how to run it"
    for module, arg in commands:
        parts = module.split(".")
        assert (ROOT.joinpath(*parts) / "__main__.py").exists() or ROOT.joinpath(*parts[:-1], parts[-1] + ".py").exists(), module
        if arg.endswith(".yaml") and not arg.startswith(("outputs/", "OUT")):
            assert (ROOT / arg).exists(), f"{job.name}: {arg}"


def test_the_config_reference_is_generated_from_the_schema():
    """docs/config.md is `python docs/reference.py`'s output for today's schema: a key added, renamed or
    re-documented in raytune_sd3/config/ fails here until the reference is regenerated."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference", ROOT / "docs" / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert (ROOT / "docs" / "config.md").read_text() == reference.render(), "run: python docs/reference.py"


def test_the_readme_is_short_and_its_timings_are_measured():
    """At most 200 lines; each timing in its setups table is the one benchmarks/first_hour.py measured
    (benchmarks/first_hour.json), so a faster or slower demo shows up here once the script is rerun."""
    import json

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    runs = json.loads((ROOT / "benchmarks" / "first_hour.json").read_text())["runs"]
    for name, run in runs.items():
        assert run["exit"] == 0, name
        assert f"{run['seconds']:.0f} s" in readme, f"README lacks {name}: {run['seconds']:.0f} s"
    assert "benchmarks/first_hour.py" in readme
