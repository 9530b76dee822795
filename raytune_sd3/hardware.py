"""Hardware facts in one place: GPU cards (memory as the driver reports it, dense bf16 peak) and the cloud node
types that carry them. The memory estimate (memory.py, driver/checks.py) reads the memory; MFU (train/flops.py)
the peak.

Peaks are dense (not sparse) bf16 tensor-core TFLOP/s with fp32 accumulation, from NVIDIA's data sheets and
architecture whitepapers (GeForce cards run fp32 accumulation at half their fp16-accumulate rate). None where no
bf16 peak applies (V100) or none is published for the variant (A10G).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Card:
    """One GPU model."""

    name: str
    """Our name for it (`--gpu`, cluster files' node types resolve to it), e.g. H100-80GB."""
    memory_gib: float | None
    """Total memory as nvidia-smi reports it (the marketing GB less ECC/reserved); None where not catalogued."""
    bf16_tflops: float | None
    """Dense bf16 tensor peak (fp32 accumulate), TFLOP/s."""
    device_match: str
    """A part of torch.cuda.get_device_name() that identifies the card (the first card whose part matches wins)."""


# Order matters for matching device names: "H100 PCIe" before "H100", "GH200" before "H200", "L40S"/"L40" before
# "L4".
CARDS = (
    Card("H100-PCIe-80GB", 79.6, 756, "H100 PCIe"),
    Card("H100-NVL-94GB", None, 835, "H100 NVL"),
    Card("H100-80GB", 79.6, 989, "H100"),
    Card("GH200", None, 989, "GH200"),
    Card("H200-141GB", 139.8, 989, "H200"),
    Card("B200", None, 2250, "B200"),
    Card("A100-40GB", 39.4, 312, "A100"),
    Card("A100-80GB", 79.2, 312, "A100"),
    Card("L40S-48GB", 44.4, 362, "L40S"),
    Card("L40-48GB", 44.4, 181, "L40"),
    Card("L4-24GB", 22.0, 121, "L4"),
    Card("A10G-24GB", 22.0, None, "A10G"),
    Card("V100-16GB", 15.8, None, "V100"),
    Card("V100-32GB", 31.7, None, "V100"),
    # Consumer cards, where LoRA training on one box often happens.
    Card("RTX-3060-12GB", 12.0, 25.6, "RTX 3060"),
    Card("RTX-4090-24GB", 24.0, 165.2, "RTX 4090"),
    Card("RTX-5090-32GB", 31.8, 209.5, "RTX 5090"),
)

# GiB per card name, for the cards whose memory is catalogued (what the memory preflight can check against).
GPU_GIB = {c.name: c.memory_gib for c in CARDS if c.memory_gib is not None}


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak of the card torch names `device_name` (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    return next((c.bf16_tflops for c in CARDS if c.device_match in device_name), None)


# Ray's `accelerator_type:<label>` node resource -> the cards it may be. Ray names a card by its model only
# (ray/_private/accelerators/nvidia_gpu.py: "NVIDIA A100-SXM4-80GB" -> "A100", "NVIDIA GeForce RTX 4090" ->
# "GeForce-RTX-4090"), so a label that covers several memory sizes lists them all; "A100-40G"/"A100-80G" are the
# labels Ray documents for adding by hand where the size matters.
RAY_ACCELERATORS: dict[str, tuple[str, ...]] = {
    "H100": ("H100-80GB", "H100-PCIe-80GB"), "H200": ("H200-141GB",),
    "A100": ("A100-40GB", "A100-80GB"), "A100-40G": ("A100-40GB",), "A100-80G": ("A100-80GB",),
    "L40S": ("L40S-48GB",), "L40": ("L40-48GB",), "L4": ("L4-24GB",), "A10G": ("A10G-24GB",),
    "V100": ("V100-16GB", "V100-32GB"),
    "GeForce-RTX-3060": ("RTX-3060-12GB",), "GeForce-RTX-4090": ("RTX-4090-24GB",),
    "GeForce-RTX-5090": ("RTX-5090-32GB",),
}


def card_of_ray_accelerator(label: str) -> tuple[str, float, bool] | None:
    """(card, GiB, whether larger variants exist) for Ray's accelerator label: the smallest memory the label may
    mean, so what is planned for it fits every variant; None where no variant's memory is catalogued."""
    known = sorted((GPU_GIB[c], c) for c in RAY_ACCELERATORS.get(label, ()) if c in GPU_GIB)
    if not known:
        return None
    gib, card = known[0]
    return card, gib, known[-1][0] > gib


# Node type -> (GPU, GPUs per node): AWS instance types, GCP machine types, GKE accelerator labels.
NODE_TYPES: dict[str, tuple[str, int]] = {
    "p5.48xlarge": ("H100-80GB", 8), "p5e.48xlarge": ("H200-141GB", 8), "p5en.48xlarge": ("H200-141GB", 8),
    "p4d.24xlarge": ("A100-40GB", 8), "p4de.24xlarge": ("A100-80GB", 8),
    "p3.2xlarge": ("V100-16GB", 1), "p3.8xlarge": ("V100-16GB", 4), "p3.16xlarge": ("V100-16GB", 8),
    "p3dn.24xlarge": ("V100-32GB", 8),
    **{f"g5.{s}": ("A10G-24GB", n) for s, n in [("xlarge", 1), ("2xlarge", 1), ("4xlarge", 1), ("8xlarge", 1),
                                               ("16xlarge", 1), ("12xlarge", 4), ("24xlarge", 4), ("48xlarge", 8)]},
    **{f"g6.{s}": ("L4-24GB", n) for s, n in [("xlarge", 1), ("2xlarge", 1), ("4xlarge", 1), ("8xlarge", 1),
                                             ("16xlarge", 1), ("12xlarge", 4), ("24xlarge", 4), ("48xlarge", 8)]},
    **{f"g6e.{s}": ("L40S-48GB", n) for s, n in [("xlarge", 1), ("2xlarge", 1), ("4xlarge", 1), ("8xlarge", 1),
                                                ("16xlarge", 1), ("12xlarge", 4), ("24xlarge", 4), ("48xlarge", 8)]},
    **{f"a3-highgpu-{n}g": ("H100-80GB", n) for n in (1, 2, 4, 8)},
    "a3-megagpu-8g": ("H100-80GB", 8), "a3-edgegpu-8g": ("H100-80GB", 8), "a3-ultragpu-8g": ("H200-141GB", 8),
    **{f"a2-highgpu-{n}g": ("A100-40GB", n) for n in (1, 2, 4, 8)},
    "a2-megagpu-16g": ("A100-40GB", 16),
    **{f"a2-ultragpu-{n}g": ("A100-80GB", n) for n in (1, 2, 4, 8)},
    **{f"g2-standard-{c}": ("L4-24GB", n) for c, n in [(4, 1), (8, 1), (12, 1), (16, 1), (32, 1), (24, 2), (48, 4),
                                                        (96, 8)]},
    # GKE node labels (cloud.google.com/gke-accelerator); the count comes from the pod's nvidia.com/gpu limit.
    "nvidia-h100-80gb": ("H100-80GB", 1), "nvidia-h100-mega-80gb": ("H100-80GB", 1),
    "nvidia-h200-141gb": ("H200-141GB", 1), "nvidia-a100-80gb": ("A100-80GB", 1),
    "nvidia-tesla-a100": ("A100-40GB", 1), "nvidia-l4": ("L4-24GB", 1), "nvidia-a10g": ("A10G-24GB", 1),
}


def gpu_of_node_type(node_type: str) -> tuple[str, int]:
    """(GPU name, GPUs per node) of an AWS instance type, GCP machine type or GKE accelerator label."""
    if node_type in NODE_TYPES:
        return NODE_TYPES[node_type]
    if node_type in GPU_GIB:
        return node_type, 1
    raise ValueError(f"unknown node type {node_type!r}; known: {', '.join(sorted(NODE_TYPES))} "
                     f"(or a GPU: {', '.join(GPU_GIB)})")


def gpu_memory(spec: str) -> tuple[str, float]:
    """(what to call it, GiB) of `--gpu`: a card name (GPU_GIB) or a plain size, "12GB", "12GiB" or "10.5G".

    A plain size is read as GiB: a consumer card sold as 12 GB has 12 GiB (12288 MiB in nvidia-smi); data-centre
    cards report less than their name says (an 80 GB H100: 79.6 GiB), so name those.
    """
    if spec in GPU_GIB:
        return spec, GPU_GIB[spec]
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)\s*", spec, flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--gpu {spec!r}: a card ({', '.join(GPU_GIB)}) or a memory size such as 12GB")
    return f"a {m.group(1)} GiB GPU", float(m.group(1))
