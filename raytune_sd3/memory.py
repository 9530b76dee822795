"""Per-GPU memory of one LoRA training step, estimated in milliseconds before any GPU is rented.

    total = base weights (+ VAE for validation) + LoRA params, grads and optimizer state + activations + runtime

Everything comes from the transformer's diffusers config.json (read from the model folder or the local HF cache;
a built-in table covers the SD3 / SD3.5 models on the hub) and the job: dtype and model.quantize, LoRA targets,
rank and dtype, optimizer, batch, resolution, T5 length, gradient checkpointing, workers and train.strategy.
Assumptions, each stated where it is used:

- Activations are what autograd keeps for the backward of a frozen base with LoRA adapters, counted per block and
  per token in units of the hidden width (`block_activation_bytes`); checked against the exact allocation trace of
  diffusers' SD3Transformer2DModel (benchmarks/tracer.py on the meta device, flash attention) for SD3 Medium, SD3.5 Medium
  and SD3.5 Large: within -0.2..+3.3% of the whole step's peak (benchmarks/RESULTS.md).
- Attention is flash / memory-efficient SDPA (PyTorch picks it on Ampere and newer for these shapes): it keeps
  q, k, v, the output and the log-sum-exp, never the S x S matrix.
- Under bf16 autocast (train.mixed_precision bf16, the GPU default) the step runs as train/loop.py runs it:
  LayerNorms keep fp32 inputs (CUDA's autocast runs layer_norm in fp32), matmuls and attention bf16, and each
  LoRA layer keeps a bf16 copy of its input (models.lora.LoraAutocast turns peft's fp32 cast off). Checked against
  a real CPU step given CUDA's autocast policy (benchmarks/tracer.py), since autocast does not run on meta.
- `runtime` is the CUDA context, cuBLAS workspace and NCCL buffers (1.5 GiB) plus 10% of the activations for the
  caching allocator's fragmentation: a margin taken from common practice, not measured here (no GPU).
- DDP keeps a second copy of the gradients in its reducer buckets; ZeRO-2 shards gradients and optimizer state
  over the workers, ZeRO-3 the base weights too (plus two gathered blocks in flight); DeepSpeed's own buckets are
  not modelled. Quantised linears (model.quantize; the AdaLN, embedding and output linears stay in `dtype`)
  cost QUANT_BYTES per weight, and their activations are the unquantised base's (models/quantize.py); nf4 and
  int2 add one dequantised weight in flight; paged optimizer state is counted on the GPU.
- Scheduled sampling (flow.scheduled_sampling) adds no term: its rollout forwards run without autograd (a block's
  temporaries are freed as it ends, below what the training forward keeps) and end before the training forward
  starts; they cost time (up to max_step_offset forwards a micro-batch), not memory.

The tracer that checks these figures (one real training step's peak tensor memory, on "meta" in seconds for any
size) lives beside the benchmarks: benchmarks/tracer.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raytune_sd3.config import OPTIMIZERS
from raytune_sd3.hardware import GIB
from raytune_sd3.models.catalogue import SD3_VAE_PARAMS, TransformerShape

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# model.quantize: bytes per weight of the quantised linears (models/quantize.py: quantised_linear) incl. scales.
# optimum-quanto int8/fp8: a scale per row, ~0; int4/int2: a bf16 scale and shift per group of 128. bitsandbytes
# nf4: 4 bits, an absmax per block of 64 stored in 8 bits (double quantisation) + an fp32 scale per 256 blocks.
# Everything else stays in `dtype`.
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128, "int2": 0.25 + 4 / 128,
               "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
# train.optimizer: bytes of optimizer state per LoRA parameter come from the registry (config.OPTIMIZERS, checked
# against one real step of each). Paged state is counted on the GPU: CUDA moves it to host RAM only when the GPU
# runs short, which saves the run from out-of-memory at the cost of speed, not memory planned.
STRATEGIES = ("ddp", "zero2", "zero3")
RUNTIME_BYTES = 1.5 * GIB  # CUDA context + cuBLAS workspace + NCCL buffers (assumed; see module docstring)
FRAGMENTATION = 0.10  # caching-allocator slack on the activations (assumed)
TEXT_CLIP_TOKENS = 77  # CLIP-L/G tokens on the sequence before T5's

def linear_layers(shape: TransformerShape) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every nn.Linear of the transformer, named as diffusers names them.

    Each has a bias. Mirrors diffusers' SD3Transformer2DModel / JointTransformerBlock: the last block only projects
    the text stream (context_pre_only) and has no text feed-forward; SD3.5 Medium's dual-attention blocks add a
    second image-only attention (attn2) and a 9-way AdaLN.
    """
    d, cap = shape.width, shape.caption_projection_dim
    layers = [
        ("time_text_embed.timestep_embedder.linear_1", 256, d), ("time_text_embed.timestep_embedder.linear_2", d, d),
        ("time_text_embed.text_embedder.linear_1", shape.pooled_projection_dim, d),
        ("time_text_embed.text_embedder.linear_2", d, d),
        ("context_embedder", shape.joint_attention_dim, cap),
    ]
    for i in range(shape.num_layers):
        b = f"transformer_blocks.{i}."
        last, dual = i == shape.num_layers - 1, i in shape.dual_attention_layers
        layers.append((b + "norm1.linear", d, (9 if dual else 6) * d))
        layers.append((b + "norm1_context.linear", d, (2 if last else 6) * d))
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"):
            layers.append((b + "attn." + n, d, d))
        if not last:
            layers.append((b + "attn.to_add_out", d, d))
        if dual:
            layers += [(b + "attn2." + n, d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")]
        ffs = ("ff",) if last else ("ff", "ff_context")
        for ff in ffs:
            layers += [(b + ff + ".net.0.proj", d, 4 * d), (b + ff + ".net.2", 4 * d, d)]
    layers += [("norm_out.linear", d, 2 * d), ("proj_out", d, shape.patch_size**2 * shape.out_channels)]
    return layers


def transformer_params(shape: TransformerShape) -> int:
    """Parameters of the transformer (the pos-embed table is a buffer, counted by `transformer_buffers`)."""
    linears = sum(i * o + o for _, i, o in linear_layers(shape))
    p = shape.patch_size
    patch_embed = shape.in_channels * p * p * shape.width + shape.width
    norms = 0
    if shape.qk_norm:  # RMSNorm(head_dim) on q and k of both streams, and of attn2 in dual blocks
        norms = shape.head_dim * (4 * shape.num_layers + 2 * len(shape.dual_attention_layers))
    return linears + patch_embed + norms


def transformer_buffers(shape: TransformerShape) -> int:
    """Elements of the sin-cos position table (pos_embed_max_size^2 x width); diffusers builds it in fp32."""
    return shape.pos_embed_max_size**2 * shape.width


def targeted_layers(shape: TransformerShape, targets: str | list[str],
                    blocks: list[int] | None = None) -> list[tuple[str, int, int]]:
    """(name, in, out) of the linears that get an adapter, matched exactly as models/lora.py matches them."""
    from raytune_sd3.models.lora import PRESETS  # one source of truth for the presets

    suffixes = PRESETS[targets] if isinstance(targets, str) else targets
    found = []
    for name, i, o in linear_layers(shape):
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if blocks is not None:
            parts = name.split(".")
            if parts[0] != "transformer_blocks" or int(parts[1]) not in blocks:
                continue
        found.append((name, i, o))
    return found


def lora_params(shape: TransformerShape, targets: str | list[str], rank: int, blocks: list[int] | None = None,
                kind: str = "lora", factor: int = -1, full_matrix: bool = False) -> int:
    """Adapter parameters: rank x (in + out) per targeted linear, and for DoRA its magnitude (out) too; for LyCORIS's
    lokr / loha (`factor`, `full_matrix`: LoKr's) what the library gives each layer."""
    layers = targeted_layers(shape, targets, blocks)
    if kind in ("lokr", "loha"):
        from raytune_sd3.models.lycoris import lycoris_layer_params  # the library counts its own factors

        return sum(lycoris_layer_params(kind, i, o, rank, factor, full_matrix) for _, i, o in layers)
    return sum(rank * (i + o) + (o if kind == "dora" else 0) for _, i, o in layers)


def dora_bytes(shape: TransformerShape, targets: str | list[str], blocks: list[int] | None, act_bytes: int,
               lora_bytes: int, batch: int, s_img: int, s_txt: int) -> tuple[float, float]:
    """(activations, transient) that DoRA adds to a LoRA (peft's DoraLinearLayer): each layer keeps its base output
    and its LoRA output (out wide, for the magnitude's gradient); its row norms are computed one layer at a time
    from an in x in identity pushed through the LoRA, the LoRA's in x out product, the base weight cast and their
    sum (the largest layer's set is the transient peak)."""
    layers = targeted_layers(shape, targets, blocks)
    text = ("add_", "to_add_out", "ff_context")  # layers on the text stream; the rest see the image tokens
    kept = sum(2 * batch * (s_txt if any(t in name for t in text) else s_img) * o * act_bytes
               for name, _, o in layers)
    transient = max(((i * i + 2 * i * o) * lora_bytes + i * o * act_bytes for _, i, o in layers), default=0)
    return kept, transient


def lycoris_bytes(shape: TransformerShape, targets: str | list[str], blocks: list[int] | None, kind: str,
                  act_bytes: int, batch: int, s_img: int, s_txt: int) -> tuple[float, float]:
    """(activations, transient) that a LyCORIS adapter adds to a LoRA's (models/lycoris.py runs it in LyCORIS's
    bypass mode: the base layer's output plus the factors applied to the input). LoKr applies its two Kronecker
    factors one after the other and keeps the middle product for backward, as wide as the layer's output; LoHa
    builds its out x in weight difference (the Hadamard product of two rank products, fp32) and keeps it, cast
    to the activations' dtype, for its matmul's backward. Assumed from LyCORIS's code, not traced."""
    layers = targeted_layers(shape, targets, blocks)
    text = ("add_", "to_add_out", "ff_context")  # layers on the text stream; the rest see the image tokens
    if kind == "lokr":
        kept = sum(batch * (s_txt if any(t in name for t in text) else s_img) * o * act_bytes for name, _, o in layers)
        return kept, 0.0
    return sum(i * o * act_bytes for _, i, o in layers), max((3 * i * o * 4 for _, i, o in layers), default=0)


# --- activations ------------------------------------------------------------------------------------------------


def _lora_inputs(n_modules: int, shared_input: bool, act_bytes: int, autocast: bool) -> float:
    """Bytes per token per width unit that the LoRA branches of `n_modules` linears on one input keep.

    peft casts the input to the adapter's dtype (fp32) in every LoRA module: on a bf16/fp16 base each module keeps
    its own fp32 copy; on an fp32 base the cast is a no-op and modules reading one tensor share it. Under bf16
    autocast peft's cast is off and autocast casts for each matmul: a bf16 copy per module (the inputs of q, k, v
    and the feed-forward are fp32 LayerNorm outputs), or the bf16 tensor itself where one module reads it.
    """
    if n_modules == 0:
        return 0.0
    if autocast:
        return 2.0 * n_modules
    if act_bytes == 4:
        return 4.0 if shared_input else 4.0 * n_modules
    return 4.0 * n_modules


def block_activation_bytes(shape: TransformerShape, targets: str | list[str], act_bytes: int,
                           blocks: list[int] | None = None, autocast: bool = False) -> tuple[float, float]:
    """(image, text) bytes per token per unit of width that one training step keeps for backward, summed over blocks.

    What autograd keeps with a frozen base (frozen linears keep nothing; their LoRA branches keep their input):
    per stream and block, LayerNorm inputs (2 x act), flash-attention q, k, v and output (4 x act, over the joint
    sequence), the tanh-GELU input (4 x act, 4x width), qk RMSNorm inputs (fp32), and the LoRA inputs. Under
    bf16 autocast (`act_bytes` 2) LayerNorm inputs are fp32 (autocast's cast copy, or the fp32 stream of an fp32
    base). The last block only projects the text stream (no text feed-forward); dual-attention blocks (SD3.5
    Medium) add an image-only attention. Checked against saved-tensor traces (tests/test_check.py): within 1%
    without autocast, within 5% under it.
    """
    # imported here for start-up time: models.lora loads torch
    from raytune_sd3.models.lora import PRESETS

    suffixes = set(PRESETS[targets] if isinstance(targets, str) else targets)

    def n(*names: str) -> int:
        return sum(1 for s in names if s in suffixes)

    a = act_bytes
    ln = 4 if autocast else a  # a LayerNorm's saved input
    # qk RMSNorm (SD3.5) computes in fp32: it keeps the fp32 input of q and k, and below fp32 also a cast copy.
    qk = (8.0 + (2 * a if a != 4 else 0)) if shape.qk_norm else 0.0
    img = txt = 0.0
    for i in range(shape.num_layers):
        last, dual = i == shape.num_layers - 1, i in shape.dual_attention_layers
        on = blocks is None or i in blocks

        def lora(*names: str, shared: bool = True, width: float = 1.0, _on: bool = on) -> float:
            return _lora_inputs(n(*names), shared, a, autocast) * width if _on else 0.0

        # image stream
        img += 2 * ln + 4 * a + 4 * a + qk  # LN1, LN2 inputs; q k v out; GELU input
        img += lora("attn.to_q", "attn.to_k", "attn.to_v") + lora("attn.to_out.0")
        img += lora("ff.net.0.proj") + lora("ff.net.2", width=4.0)
        if dual:
            img += 4 * a + qk + lora("attn2.to_q", "attn2.to_k", "attn2.to_v") + lora("attn2.to_out.0")
        # text stream
        txt += ln + 4 * a + qk  # LN1 input; q k v out
        txt += lora("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
        if not last:
            txt += ln + 4 * a + lora("attn.to_add_out")  # LN2, GELU
            txt += lora("ff_context.net.0.proj") + lora("ff_context.net.2", width=4.0)
    img += ln  # final AdaLN's LayerNorm input
    return img, txt


def activation_bytes(shape: TransformerShape, targets: str | list[str], act_bytes: int, batch: int,
                     resolution: int, t5_tokens: int, blocks: list[int] | None = None, autocast: bool = False) -> int:
    """Bytes kept for backward by one micro-batch: batch x width x (image tokens x img + text tokens x txt).

    Image tokens = (resolution / 8 / patch)^2; text tokens = 77 CLIP + t5_tokens T5. A quantised base keeps what
    an unquantised one keeps (models/quantize.py: its linears keep no input).
    """
    img, txt = block_activation_bytes(shape, targets, act_bytes, blocks, autocast)
    s_img = (resolution // (8 * shape.patch_size)) ** 2
    s_txt = TEXT_CLIP_TOKENS + t5_tokens
    return int(batch * shape.width * (s_img * img + s_txt * txt))


def backward_transient_bytes(shape: TransformerShape, act_bytes: int, batch: int, resolution: int,
                             t5_tokens: int) -> int:
    """Peak extra memory inside one block's backward (gradients of its activations, 4x-wide for the feed-forward):
    about 8 activations of the joint sequence at full width."""
    s = (resolution // (8 * shape.patch_size)) ** 2 + TEXT_CLIP_TOKENS + t5_tokens
    return int(batch * s * shape.width * 8 * act_bytes)


def autocast_weight_copies(shape: TransformerShape, blocks: list[int] | None = None) -> int:
    """Bytes of the bf16 weight copies that bf16 autocast over an fp32 base keeps for backward.

    Autocast casts a frozen fp32 weight to bf16 at every call (its cache keeps only weights that need a gradient),
    and a linear whose input needs a gradient keeps that copy for backward: the attention and feed-forward linears
    from the first block with LoRA on, less that block's q/k/v projections, which read its gradient-free input
    (the AdaLN linears read the timestep embedding, which needs none).
    """
    from raytune_sd3.models.quantize import quantised_linear  # the attention/feed-forward linears of the blocks

    first = min(blocks) if blocks else 0
    n = 0
    for name, i, o in linear_layers(shape):
        if not quantised_linear(name):
            continue
        block = int(name.split(".")[1])
        reads_block_input = name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                        "add_v_proj")
        if block > first or (block == first and not reads_block_input):
            n += i * o
    return 2 * n


# --- the estimate -----------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of one training step, line by line; `total` is the peak of the busiest rank (rank 0)."""

    lines: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, nbytes: float) -> None:
        self.lines.append((what, int(nbytes)))

    @property
    def total(self) -> int:
        return sum(b for _, b in self.lines)

    def table(self, gpu_bytes: float | None = None) -> str:
        def size(b: float) -> str:
            return f"{b / GIB:9.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):9.2f} MiB"

        rows = [f"  {what:<74} {size(b)}" for what, b in self.lines]
        rows.append(f"  {'total per GPU (rank 0)':<74} {size(self.total)}")
        if gpu_bytes:
            rows[-1] += f"  of {gpu_bytes / GIB:.1f} GiB ({100 * self.total / gpu_bytes:.0f}%)"
        return "\n".join(rows)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def estimate(shape: TransformerShape, *, dtype: str, targets: str | list[str], rank: int, batch: int,
             resolution: int, t5_tokens: int, num_workers: int = 1, strategy: str = "ddp",
             mixed_precision: str = "no", quantization: str | None = None, blocks: list[int] | None = None,
             vae_params: int | None = SD3_VAE_PARAMS, validation_resolution: int = 0, vae_channels: int = 128,
             gradient_checkpointing: bool = False, lora_dtype: str = "fp32", optimizer: str = "adamw",
             runtime: bool = True, lora_kind: str = "lora", ema: bool = False, lokr_factor: int = -1,
             lokr_full_matrix: bool = False, ema_sampling: bool = False) -> MemoryEstimate:
    """Peak per-GPU memory of one LoRA training step (see the module docstring for the assumptions).

    `vae_params`: a rank keeps the VAE loaded once it has made validation images, rank 0 always (None: no
    validation).
    `runtime`: add the CUDA context / NCCL / fragmentation margin (off for CPU comparisons).
    `gradient_checkpointing`: each block keeps only its inputs and recomputes the rest in backward.
    `quantization`: model.quantize (None or "none": unquantised).
    `lora_kind`: lora.kind; dora adds its magnitudes, two outputs kept per layer and its row-norm working set;
    lokr / loha (`lokr_factor`, `lokr_full_matrix`: lora.lycoris) their own parameters and rebuilt weights.
    `ema`: train.ema_decay is set: one fp32 copy of the LoRA parameters on every worker.
    `ema_sampling`: validation.use_ema: while validation samples with the EMA swapped in, the trained LoRA is kept
    aside (one more copy, in lora_dtype), between steps like the decode.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    n = max(1, num_workers)
    wb = BYTES[dtype]
    # bf16 autocast: matmul outputs and attention are bf16 whatever the base's dtype (block_activation_bytes counts
    # its fp32 LayerNorm inputs); the residual stream, which checkpointing keeps, stays in the base's dtype.
    autocast = mixed_precision == "bf16"
    act_b = 2 if (autocast or dtype in ("bf16", "fp16")) else 4
    est = MemoryEstimate()

    p_base = transformer_params(shape)
    quantization = None if quantization in (None, "none") else quantization
    if quantization:
        from raytune_sd3.models.quantize import quantised_linear  # one source of truth for what is quantised

        if quantization not in QUANT_BYTES:
            raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANT_BYTES)}")
        quantised = [(i, o) for name, i, o in linear_layers(shape) if quantised_linear(name)]
        linear_w = sum(i * o for i, o in quantised)
        base_bytes = linear_w * QUANT_BYTES[quantization] + (p_base - linear_w) * wb
        what = (f"base transformer {_count(p_base)} params ({quantization} attention/feed-forward linears "
                f"{_count(linear_w)}, rest {dtype})")
    else:
        base_bytes = p_base * wb
        what = f"base transformer {_count(p_base)} params ({dtype})"
    base_bytes += transformer_buffers(shape) * 4
    if strategy == "zero3":
        # ZeRO-3 shards the weights; a block is gathered before use, the next one prefetched.
        per_block = base_bytes / max(1, shape.num_layers)
        est.add(what + f", ZeRO-3 shard 1/{n} + 2 gathered blocks", base_bytes / n + 2 * per_block)
    else:
        est.add(what, base_bytes)
    if quantization in ("nf4", "int2"):  # bitsandbytes' nf4 and quanto's int2 (no int4-style fused kernel)
        # dequantise a layer's weight for each matmul, one layer at a time (traced: benchmarks/tracer.py)
        est.add(f"{quantization} weight dequantised for a matmul (the largest linear, {dtype})",
                max(i * o for i, o in quantised) * wb)
    if vae_params:
        est.add(f"VAE {_count(vae_params)} params ({dtype}, for validation images)", vae_params * wb)

    p_lora = lora_params(shape, targets, rank, blocks, lora_kind, lokr_factor, lokr_full_matrix)
    lb = BYTES[lora_dtype]
    shard = {"ddp": 1, "zero2": n, "zero3": n}[strategy]
    part = f", 1/{n}" if shard > 1 else ""
    adapter = {"lokr": "LoKr", "loha": "LoHa"}.get(lora_kind, "LoRA")
    est.add(f"{adapter} {_count(p_lora)} params ({lora_dtype}){part if strategy == 'zero3' else ''}",
            p_lora * lb / (n if strategy == "zero3" else 1))
    est.add(f"{adapter} gradients ({lora_dtype}){part}", p_lora * lb / shard)
    if strategy == "ddp" and num_workers > 1:
        est.add(f"DDP gradient buckets ({lora_dtype})", p_lora * lb)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    facts = OPTIMIZERS[optimizer]
    paged = " (paged: counted on the GPU, spills to RAM)" if facts.paged else ""
    est.add(f"{optimizer} state{part}{paged}", p_lora * facts.state_bytes(lb) / shard)
    if ema:
        est.add("EMA of the LoRA (fp32, whole on every worker)", p_lora * 4)

    act = activation_bytes(shape, targets, act_b, batch, resolution, t5_tokens, blocks, autocast)
    if autocast and dtype == "fp32" and not quantization:
        est.add("bf16 weight copies kept for backward (autocast, fp32 base)"
                + (", one block's" if gradient_checkpointing else ""),
                autocast_weight_copies(shape, blocks) / (shape.num_layers if gradient_checkpointing else 1))
    s_img = (resolution // (8 * shape.patch_size)) ** 2
    s_all = s_img + TEXT_CLIP_TOKENS + t5_tokens
    if gradient_checkpointing:
        one_block = act / shape.num_layers
        act = batch * s_all * shape.width * wb * shape.num_layers + one_block
        est.add(f"activations, checkpointed: block inputs x {shape.num_layers} + one block recomputed", act)
    else:
        est.add(f"activations: batch {batch} x ({s_img} image + {s_all - s_img} text tokens) x {shape.num_layers} "
                "blocks", act)
    if lora_kind == "dora":
        kept, transient = dora_bytes(shape, targets, blocks, act_b, lb, batch, s_img, s_all - s_img)
        kept /= shape.num_layers if gradient_checkpointing else 1  # one block's, recomputed
        est.add("DoRA: base and LoRA outputs kept per layer" + (", one block's" if gradient_checkpointing else ""),
                kept)
        est.add("DoRA row norms, one layer at a time (the largest)", transient)
        act += kept
    if lora_kind in ("lokr", "loha"):
        kept, transient = lycoris_bytes(shape, targets, blocks, lora_kind, act_b, batch, s_img, s_all - s_img)
        kept /= shape.num_layers if gradient_checkpointing else 1  # one block's, recomputed
        est.add(("LoKr: each layer's middle product" if lora_kind == "lokr" else
                 "LoHa: each layer's weight difference") + " kept for backward"
                + (", one block's" if gradient_checkpointing else ""), kept)
        if transient:
            est.add("LoHa weight difference built in fp32, one layer at a time (the largest)", transient)
        act += kept
    est.add("backward transient (one block's activation gradients)",
            backward_transient_bytes(shape, act_b, batch, resolution, t5_tokens))
    if runtime:
        est.add(f"runtime: CUDA context, NCCL, cuBLAS ({RUNTIME_BYTES / GIB:.1f} GiB) + {FRAGMENTATION:.0%} "
                "fragmentation", RUNTIME_BYTES + FRAGMENTATION * act)
    if vae_params and validation_resolution:
        # Validation runs between steps (activations freed); the VAE decode keeps ~6 full-resolution maps of the
        # decoder's widest level (block_out_channels[0] channels). Assumed, not traced.
        decode = 6 * vae_channels * validation_resolution**2 * wb
        kept = p_lora * lb if ema_sampling else 0
        if decode + kept > act and decode + kept - act > 0.01 * est.total:
            est.notes.append(f"the validation decode at {validation_resolution}px (~{decode / GIB:.1f} GiB) sets "
                             "the peak")
            est.add("validation VAE decode beyond the training activations"
                    + (" (+ the trained LoRA kept aside while the EMA samples)" if kept else ""), decode + kept - act)
    return est
