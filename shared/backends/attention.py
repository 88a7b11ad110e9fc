"""Decode attention on CPU: one new query token per sequence over its own cached keys and values.

A numba kernel, compiled on first use and cached on disk. Each (sequence, kv head) pair is one parallel task
that streams that sequence's keys and values once, for all the query heads that share them, and reads only
the positions the sequence has (no padding to the longest sequence in the batch, no mask). Measured here
against torch's batched matmuls over the padded cache (16 rows, 40-270 positions, 30 layers, cold cache):
262 against 677 us a layer; one row: 6.4 against 22.3 us for scaled_dot_product_attention. A row's result
depends on its own inputs only, so batching does not change it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def decode_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray, out: np.ndarray, scale: np.float32
) -> None:
    """out[b, h, g] = softmax(q[b, h, g] . k[b, h, :n] * scale) @ v[b, h, :n], n = lengths[b].

    q, out: (B, K, G, D), the G query heads that read kv head K; k, v: (S >= B, K, P, D), float32.
    """
    batch, kv_heads, group, dim = q.shape
    for task in prange(batch * kv_heads):
        b = task // kv_heads
        h = task - b * kv_heads
        n = lengths[b]
        scores = np.empty((group, n), np.float32)
        for p in range(n):
            for g in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += q[b, h, g, d] * k[b, h, p, d]
                scores[g, p] = acc * scale
        for g in range(group):
            top = scores[g, 0]
            for p in range(1, n):
                top = max(top, scores[g, p])
            total = np.float32(0.0)
            for p in range(n):
                e = math.exp(scores[g, p] - top)
                scores[g, p] = e
                total += e
            for p in range(n):
                scores[g, p] /= total
        acc_out = np.zeros((group, dim), np.float32)
        for p in range(n):
            for g in range(group):
                w = scores[g, p]
                for d in range(dim):
                    acc_out[g, d] += w * v[b, h, p, d]
        out[b, h] = acc_out
