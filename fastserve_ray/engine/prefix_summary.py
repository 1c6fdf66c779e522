"""The prefix cache's block hash, and the compact summary of it a replica reports to a router.

One definition for both sides. The block manager (block_manager.py) hashes each full KV block
by (parent hash, token ids), so a block's hash stands for the whole prefix up to its end; a
prefix-aware router (serve/prefix_router.py) computes the same chain for an incoming prompt
with ``prompt_block_hashes`` and counts how many leading blocks each replica has cached.

Python's hash of a tuple of ints does not depend on ``PYTHONHASHSEED`` (only str and bytes
hashes are salted), so the router's process and the engine's process agree as long as they
run the same Python, which Ray requires of every node of a cluster anyway.

A summary is a plain dict (it travels in Serve's routing stats, pickled through the controller
to every handle): the block size and the cached blocks' hashes truncated to 32 bits, packed as
little-endian uint32 bytes, at most ``MAX_REPORTED_HASHES`` of them (32 KiB). Truncation makes
a false match possible but rare (a lookup against 8,192 entries hits a wrong one with
probability ~2e-6), and a false match only costs a routing choice, never a wrong answer: the
engine checks full hashes and token ids itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NO_PARENT = -1  # parent hash of a sequence's first block
# Bounds what one replica reports per routing-stats period; the block manager reports the
# blocks in use first, then the evictable ones that would be evicted last.
MAX_REPORTED_HASHES = 8192
SUMMARY_VERSION = 1
_MASK = 0xFFFFFFFF


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chained hash of a full block: equal only for equal token prefixes (up to collisions)."""
    return hash((parent_hash, token_ids))


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hash chain of the blocks of a prompt that a prefix-cache hit could cover.

    As the block manager looks them up: full blocks only, and never the block holding the last
    token (the engine computes at least one token to get the logits it samples from).
    """
    hashes: list[int] = []
    parent = NO_PARENT
    for i in range((len(token_ids) - 1) // block_size):
        parent = hash_block(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        hashes.append(parent)
    return hashes


def short_hash(block_hash: int) -> int:
    """The 32 bits of a block hash that a summary carries."""
    return block_hash & _MASK


def encode_summary(block_size: int, hashes: Iterable[int], num_cached_blocks: int) -> dict[str, Any]:
    """What a replica reports: its block size and its cached blocks' short hashes (bytes)."""
    full = np.fromiter(hashes, dtype=np.int64)
    packed = (full & _MASK).astype("<u4").tobytes()  # int64 & mask keeps the low 32 bits
    return {"v": SUMMARY_VERSION, "block_size": int(block_size), "hashes": packed,
            "num_reported": len(full), "num_cached_blocks": int(num_cached_blocks)}


def decode_summary(summary: Any) -> tuple[int, frozenset[int]] | None:
    """(block size, short hashes) of a summary; None for anything else (an older or absent one)."""
    if not isinstance(summary, dict) or summary.get("v") != SUMMARY_VERSION:
        return None
    block_size, packed = summary.get("block_size"), summary.get("hashes")
    if not isinstance(block_size, int) or block_size < 1 or not isinstance(packed, bytes) or len(packed) % 4:
        return None
    return block_size, frozenset(np.frombuffer(packed, dtype="<u4").tolist())


def matched_blocks(chain: Sequence[int], cached: frozenset[int] | set[int]) -> int:
    """How many leading blocks of a prompt's hash chain are in ``cached`` (short hashes).

    Leading only: the engine's lookup stops at the first block it does not hold.
    """
    n = 0
    for h in chain:
        if short_hash(h) not in cached:
            break
        n += 1
    return n
