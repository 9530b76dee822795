"""benchmarks/memory.py runs and its table says what each training option must do to a step's tensor memory:
the direction of each effect is asserted (it holds on any model if the option works), never its size."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"


def table_rows(stdout: str, names: list[str]) -> dict[str, dict[str, int]]:
    """The printed table's rows for `names`: {option: {static, lora, optimizer_state, peak}} in bytes."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in names and len(cells) == 9:
            static, lora, state, peak = (int(cells[i].replace(",", "")) for i in (2, 4, 5, 7))
            rows[cells[0]] = {"static": static, "lora": lora, "optimizer_state": state, "peak": peak}
    return rows


@pytest.mark.slow
def test_memory_benchmark_prints_a_row_per_option_and_each_option_saves_what_it_should(tiny_sd3, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import memory
    finally:
        sys.path.remove(str(BENCH))
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--no-write", "--results", str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    names = [name for name, _ in memory.OPTIONS]
    rows = table_rows(proc.stdout, names)
    assert list(rows) == names  # one row per option, in order, each measured twice with equal figures
    assert not results.exists()  # --no-write

    base = rows[memory.BASELINE]
    r = {name: rows[name] for name in names}
    assert r["bf16 autocast"]["peak"] < base["peak"]
    assert r["bf16 base"]["static"] < base["static"] and r["bf16 base"]["peak"] < base["peak"]
    assert 2 * r["bf16 LoRA + adamw_bf16"]["lora"] == base["lora"]
    assert r["int4 base (quanto)"]["static"] < r["int8 base (quanto)"]["static"] < base["static"]
    assert r["gradient checkpointing"]["peak"] < base["peak"]
    assert r["gradient checkpointing"]["static"] == base["static"]
    assert r["lion"]["optimizer_state"] == base["lora"] < base["optimizer_state"]  # one fp32 moment, not two
    assert r["stableadamw"]["optimizer_state"] == 2 * base["lora"]
    for not_measured in ("zero2 / zero3", "adamw8bit / lion8bit"):
        assert not_measured in proc.stdout
