"""Round-off bounds shared by the tests that compare two computations which may take different CPU kernels.

Two forwards of the same model can legitimately differ: a batched and a single-row fp32 forward use different
oneDNN/MKL kernels (blocking, summation order), and a bf16 autocast forward rounds every matmul/conv operand to
bf16, natively (AVX512-BF16, AMX) or emulated (AVX2, AVX-512F). Tests compare such pairs against these bounds,
which come from the arithmetic, not from one machine's observed errors; each comment says what the margin is.
"""

from __future__ import annotations

import numpy as np

FP32_U = 2.0**-24   # fp32 unit round-off (eps 2^-23 / 2)
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits (7 stored): eps 2^-8 = 0.0039, unit round-off 2^-9

# fp32, different summation order: a K-term reduction's error grows like u·sqrt(K)·|x| (random-sign rounding),
# and errors of L layers in sequence add like sqrt(L). K <= ~2300 here (the longest dot products: 3x3 convs and
# MLPs of the mini model) and L ~ 30 give u·48·5.5 ~ 1.6e-5 relative to the logit scale max|z|; 2^-15 = 3.1e-5
# is twice that. Observed on an AMD EPYC Milan (AVX2): 3.3e-6, batched vs single row.
FP32_LOGIT_REL = 2.0**-15

# bf16 autocast: every matmul/conv operand is rounded to bf16 (relative error <= 2^-9 each, products accumulated
# in fp32), about L ~ 30 roundings on the path from pixels to logits: u_bf16·sqrt(L) ~ 2.8·eps_bf16 relative
# (rms), and the largest of 50,000 pixels is ~4 sigma away. 8·eps_bf16 = 0.031 of max|z| bounds that with
# ~2x margin for the kernels of other CPUs. Observed (AVX2, emulated bf16): max|Δz| = 4.7·eps_bf16·max|z|.
BF16_LOGIT_REL = 8 * BF16_EPS


def decided(logits: np.ndarray, relative_bound: float) -> np.ndarray:
    """Pixels whose logit is farther from the decision boundary (0) than ``relative_bound``·max|z|: there a
    rounding difference within the bound cannot flip the mask. ``logits``: the fp32 reference."""
    return np.abs(logits) > relative_bound * np.abs(logits).max()


def probability_margin(logits: np.ndarray, relative_bound: float) -> float:
    """The same band in probability: |p - 1/2| <= sigmoid(bound) - 1/2 (sigmoid is monotone, slope <= 1/4)."""
    bound = relative_bound * float(np.abs(logits).max())
    return float(1.0 / (1.0 + np.exp(-bound)) - 0.5)
