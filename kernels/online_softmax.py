"""The online softmax that the attention kernels (kernels/attention.py) and the split-KV decode kernels
(kernels/decode_attention.py) share: scores in log2 units, so that ``exp2`` can be used.

``softmax(s * sm_scale) = 2^(s * qk_scale - m) / sum(...)`` with ``qk_scale = sm_scale * LOG2E``: the scale and
log2(e) fold into one multiply of the scores, and the statistics (running max ``m``, running sum ``l``, the
log-sum-exp) are all in log2 units.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def online_softmax_step(m_i, l_i, scores, qk_scale=1.0):
    """One key block of the online softmax of ``scores * qk_scale`` (``scores`` ``[M, N]``, -inf where a key is
    hidden; ``scores * qk_scale`` in log2 units; ``qk_scale`` must be positive).

    Passing the raw scores with their ``qk_scale`` folds the scale into the exp2 argument, one FMA per score
    (``2^(s * qk_scale - m)``), and into the row max (``max(s) * qk_scale``, one multiply per row); with the
    default 1.0 the scores are taken as already scaled (the multiply folds away).
    Returns ``(p, alpha, m_new, l_new)``: the block's unnormalised probabilities ``2^(s * qk_scale - m_new)``,
    the factor ``alpha = 2^(m_i - m_new)`` that rescales what was accumulated under the old max, the new
    running max and the new running sum ``l_i * alpha + rowsum(p)``. A row that has seen no visible key yet
    keeps ``m = -inf``; 0 is subtracted instead, so that ``-inf - (-inf) = NaN`` never appears (its p and
    alpha are then ``2^-inf = 0``).
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(scores * qk_scale - m_shift[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new
