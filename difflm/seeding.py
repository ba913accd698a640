"""Per-item seeds: a 63-bit seed hashed from a few parts, stable across processes, ranks, batch layouts and
Python versions (never Python's salted `hash`). One implementation, `hash_seed`, behind two named keys:

- `seed_for(*parts)` -- training (`difflm.training`): the noise of every sequence from (run seed, tag, stream
  position), dropout from (seed, "dropout", step, rank, micro-batch), the epoch order, the LoRA init.
  blake2b (8-byte digest) of ``repr(tuple(parts))``.
- `item_seed(seed, key)` -- generation and evaluation (`difflm generate`, the lm-eval model): the noise of
  one prompt from (decode seed, item id or context). sha256 of ``f"{seed}:{key}"``, first 8 bytes.

The two keys hash different texts with different algorithms because that is what earlier releases did:
a saved run resumes, and a rerun of `difflm generate` reproduces its outputs, only if every seed keeps its
value. So the algorithm is a parameter of the one function instead of being unified (which would change
every seed). `tests/test_seeding.py` pins values of both.
"""

from __future__ import annotations

import hashlib

__all__ = ["hash_seed", "item_generator", "item_seed", "seed_for", "seeded_generator"]

_MASK63 = (1 << 63) - 1


def hash_seed(text: str, algorithm: str = "blake2b") -> int:
    """A 63-bit seed from `text`: the first 8 bytes of its digest (little-endian), top bit cleared.

    `algorithm` is "blake2b" (an 8-byte blake2b digest: note that blake2b's digest size is a parameter
    of the hash, not a truncation) or "sha256" (the first 8 bytes of the 32-byte digest)."""
    data = text.encode()
    if algorithm == "blake2b":
        digest = hashlib.blake2b(data, digest_size=8).digest()
    elif algorithm == "sha256":
        digest = hashlib.sha256(data).digest()[:8]
    else:
        raise ValueError(f"unknown seed hash {algorithm!r}; use blake2b or sha256")
    return int.from_bytes(digest, "little") & _MASK63


def seed_for(*parts: int | str) -> int:
    """Training's seed of a tuple of ints/strings (blake2b of its repr)."""
    return hash_seed(repr(tuple(parts)), "blake2b")


def item_seed(seed: int, key: str | int) -> int:
    """Generation's seed of (base seed, item id): stable across processes, ranks and batch layouts (sha256)."""
    return hash_seed(f"{seed}:{key}", "sha256")


def seeded_generator(seed: int, device=None):
    """A `torch.Generator` (CPU unless `device`) seeded with `seed`."""
    import torch

    g = torch.Generator() if device is None else torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def item_generator(seed: int, *parts: str):
    """A CPU generator seeded by `item_seed(seed, parts joined by U+001F)` (the lm-eval model: one per
    request, from its context and continuation)."""
    return seeded_generator(item_seed(seed, "\x1f".join(parts)))
