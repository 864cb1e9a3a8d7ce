"""The numbers every check reports, on plain arrays: per-token cosine of image embeddings, log-softmax
of logits, KL divergence between two next-token distributions and top-1 agreement. verify, quality and
the demo compute their figures here, so one definition serves all three."""
from __future__ import annotations

import numpy as np


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity of two (n_tokens, n_embd) arrays of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1) + 1e-30)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine similarity of two (n_tokens, n_embd) arrays of the same shape."""
    return float(token_cosines(a, b).mean())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of a logits vector, in float64 (max-shifted, so large logits do not overflow)."""
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """KL(p || q) of two log-probability vectors over the same vocabulary."""
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def same_top1(log_p: np.ndarray, log_q: np.ndarray) -> bool:
    """Whether the two distributions' most likely tokens are the same."""
    return int(np.argmax(log_p)) == int(np.argmax(log_q))
