"""The hardware catalogue: device names as torch reports them map to the right card's peak (the longer names
first), and every catalogued card can be checked against."""

import pytest

from raytune_sd3.check import main as check_main
from raytune_sd3.hardware import CARDS, GPU_GIB, gpu_memory, gpu_of_node_type, peak_tflops_of


@pytest.mark.parametrize("device_name,peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121),
    ("NVIDIA GeForce RTX 3060", 25.6), ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 5090", 209.5),
    ("Tesla V100-SXM2-16GB", None), ("AMD Instinct MI300X", None),
])
def test_device_names_map_to_their_peak(device_name, peak):
    assert peak_tflops_of(device_name) == peak


def test_cards_are_unique_and_node_types_name_known_cards():
    assert len({c.name for c in CARDS}) == len(CARDS)
    assert gpu_of_node_type("p5.48xlarge") == ("H100-80GB", 8) and gpu_of_node_type("RTX-4090-24GB") == (
        "RTX-4090-24GB", 1)
    assert {"RTX-3060-12GB", "RTX-4090-24GB", "RTX-5090-32GB"} <= set(GPU_GIB)


def test_a_consumer_card_is_a_check_target(capsys):
    assert check_main(["jobs/sd35.yaml", "--gpu", "RTX-4090-24GB", "--skip-paths"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "RTX-4090-24GB" in out


def test_gpu_takes_a_card_or_a_plain_size():
    assert gpu_memory("RTX-3060-12GB") == ("RTX-3060-12GB", 12.0)
    assert gpu_memory("H100-80GB") == ("H100-80GB", 79.6)  # a name: what the card reports, not its label
    assert gpu_memory("12GB") == ("a 12 GiB GPU", 12.0)
    assert gpu_memory("10.5gib")[1] == 10.5 and gpu_memory("24G")[1] == 24.0
    for bad in ("12", "12TB", "0GB", "twelve"):
        with pytest.raises(ValueError, match="a memory size such as 12GB"):
            gpu_memory(bad)
