"""Logit processors and samplers as factories that return closures; numpy, so every backend shares them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from shared.generation.params import SamplingParams

LogitsProcessor = Callable[[np.ndarray, Sequence[int]], np.ndarray]
Sampler = Callable[[np.ndarray], int]


def make_logits_processor(params: SamplingParams, prompt_ids: Sequence[int], eos_ids: Sequence[int]) -> LogitsProcessor:
    """Bias, penalties and EOS suppression, applied to one step's logits given the tokens generated so far."""
    bias_ids = np.array(list(params.logit_bias), dtype=np.int64)
    bias_values = np.array(list(params.logit_bias.values()), dtype=np.float32)
    prompt_set = np.unique(np.asarray(prompt_ids, dtype=np.int64))
    eos = np.asarray([e for e in eos_ids], dtype=np.int64)

    def process(logits: np.ndarray, output_ids: Sequence[int]) -> np.ndarray:
        logits = logits.astype(np.float32, copy=True)
        vocab = logits.shape[-1]
        if bias_ids.size:
            ok = bias_ids < vocab
            logits[bias_ids[ok]] += bias_values[ok]
        if params.repetition_penalty != 1.0:
            # CTRL-style, as transformers does it: over the prompt and the output.
            seen = np.union1d(prompt_set, np.asarray(output_ids, dtype=np.int64)) if output_ids else prompt_set
            seen = seen[seen < vocab]
            picked = logits[seen]
            logits[seen] = np.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        if output_ids and (params.presence_penalty or params.frequency_penalty):
            # OpenAI's definition: over the output only.
            ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
        if eos.size and (params.ignore_eos or len(output_ids) < params.min_tokens):
            logits[eos[eos < vocab]] = -np.inf
        return logits

    return process


def make_sampler(params: SamplingParams) -> Sampler:
    """argmax for temperature 0, else temperature, top-k, top-p and min-p with a per-request seeded RNG.

    Works on the whole vocabulary without sorting it: top-k by partition, top-p by sorting only the few
    most likely tokens (widening until they hold the mass), min-p by a threshold.
    """
    if params.greedy:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray) -> int:
        scaled = logits.astype(np.float64) / params.temperature
        probs = np.exp(scaled - scaled.max())
        vocab = probs.shape[-1]
        if 0 < params.top_k < vocab:
            probs[np.argpartition(-probs, params.top_k - 1)[params.top_k :]] = 0.0
        if params.top_p < 1.0:
            target, k = params.top_p * probs.sum(), min(64, vocab)
            while True:
                top = np.argpartition(-probs, k - 1)[:k] if k < vocab else np.arange(vocab)
                top = top[np.argsort(-probs[top], kind="stable")]
                mass = np.cumsum(probs[top])
                if mass[-1] >= target or k == vocab:
                    break
                k = min(k * 4, vocab)
            # Smallest prefix whose mass reaches top_p; the most likely token always stays.
            keep = top[: int(np.searchsorted(mass, target)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept
        if params.min_p > 0.0:
            probs[probs < params.min_p * probs.max()] = 0.0
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), vocab - 1))

    return sample


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens with their log-probabilities, most likely first."""
    if k <= 0:
        return []
    top = np.argpartition(-logprobs, k - 1)[:k]
    top = top[np.argsort(-logprobs[top], kind="stable")]
    return [(int(t), float(logprobs[t])) for t in top]
