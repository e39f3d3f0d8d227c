"""FP8 mixed-precision training, the DeepSeek-V3 recipe (V3 report §3.3, Appendix B).

Why FP8. Hopper's tensor cores multiply FP8 at twice the BF16 rate (1,979 against 989 dense
TFLOP/s on an H100/H200 SXM) and FP8 operands move half the bytes. The price is range and
precision: E4M3 keeps 3 mantissa bits and a largest finite value of 448; E5M2 trades one
mantissa bit for range. Training in FP8 is a question of where to put the scales.

Formats: E4M3 everywhere (§3.3.2, "mantissa over exponents"). Earlier FP8 recipes used
E4M3 forward and E5M2 for gradients, whose range outliers need. V3 makes the scales fine
enough that range is no longer the problem, and spends the bits on precision instead.

Fine-grained scales (§3.3.2, Figure 7a). One scale per tensor lets a single outlier flatten
every other value into E4M3's few representable numbers near zero. V3 scales small groups:
- activations and activation gradients per token per 128 channels: 1x128 tiles;
- weights per 128x128 block (a block serves W and W^T alike, so the backward's dgrad
  reuses the forward's quantized weight).
Appendix B.2 tried 128x128 blocks for the activation gradients too: the run diverged, since
token-wise outliers in gradients do not fit a block's one scale. Hence 1x128 there.

Online scales (§3.3.2). Each tile's scale is computed from its own amax at the moment it is
quantized (amax / 448); no delayed scaling from past iterations' amax histories.

Accumulation (§3.3.2, Figure 7b). Hopper's FP8 tensor-core MMA keeps only about 14 bits in
its accumulator; summing a K = 4096 dot product there loses up to ~2% relative. V3 promotes
the partial sums to FP32 registers every N_C = 128 elements of K, where the per-tile scales
are applied too. cuBLAS's blockwise-scaled FP8 GEMM (`torch._scaled_mm` with 1x128/128x128
scales) does the same, since its scales change every 128 of K; the Triton kernels here for
the grouped expert GEMMs do it explicitly (kernels.py).

What stays in BF16/FP32 (§3.3.1, Figure 6). The GEMMs of the linear layers (attention
projections, dense and expert SwiGLU MLPs, MTP's projection) run in FP8: fprop, dgrad and
wgrad. The embedding, the output head, the MoE router (gate), the norms and the attention
operator (softmax(QK^T)V) stay in BF16/FP32, where low precision costs most and saves
little. Master weights, weight gradients and optimizer arithmetic are FP32; AdamW's two
moments may be BF16 (§3.3.3; train/optim.py).

Low-precision storage (§3.3.3). What the backward reads is cached in FP8: the input of each
FP8 linear (dequantized in the backward and requantized in 128x1 tiles for the wgrad, which
contracts over tokens), and the SwiGLU's inputs, whose output is recomputed in the backward
instead of stored. The input of the linear after attention is also read by the attention's
backward, so V3 keeps it in E5M6; here it stays BF16 (`Fp8Config.keep_input`).

Layout of this package:
    quant.py    the quantize -> dequantize maths (tiles, blocks, ragged edges, amax = 0, inf/NaN)
    gemm.py     the three GEMM shapes, each an emulated float32 twin and a fast path
    kernels.py  Triton grouped FP8 GEMMs for the experts (torch has no blockwise grouped one)
    linear.py   Fp8TrainLinear: one linear layer's autograd function
    swiglu.py   Fp8TrainMLP, Fp8TrainExperts: SwiGLU in FP8 with the recompute, dense and grouped
    convert.py  convert_to_fp8: the module swap by name, Fp8Config, the device check

(infer/fp8_weights.py is the other FP8: weights kept in FP8 at inference, computed in BF16.)

The twin is what runs on the CPU (`--precision fp8` there is emulated: same quantization,
float32 GEMMs, for checking the maths, not for speed) and what the GPU tests compare the
fast path against.
"""

from .convert import Fp8Config, Fp8Unsupported, convert_to_fp8, fast_fp8, fp8_modules
from .linear import Fp8TrainLinear
from .quant import Quantized, dequantize, quantize, quantize_tokens
from .swiglu import Fp8TrainExperts, Fp8TrainMLP

__all__ = ["Fp8Config", "Fp8TrainExperts", "Fp8TrainLinear", "Fp8TrainMLP", "Fp8Unsupported", "Quantized",
           "convert_to_fp8", "dequantize", "fast_fp8", "fp8_modules", "quantize", "quantize_tokens"]
