"""Hands out fixed-size blocks of the paged KV cache (ids only; the tensors live in the model runner),
and keeps full blocks for reuse by later requests with the same prefix (prefix caching).

A full block is identified by a hash chained over the token ids of every block up to it, so equal
hashes mean equal prefixes (the token ids are compared too: a hash collision is a miss, not a wrong
cache). The cache lives and dies with the engine's KV tensors, whose contents are fixed by the
loaded model and splices, so nothing else needs to enter the hash. Blocks are reference-counted:
a block shared by several sequences returns to the free list when the last one lets go. Free
blocks keep their contents and hash until they are handed out again, oldest first (LRU); a
sequence frees its blocks last-first, so its prefix outlives its tail.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Tokens

NO_HASH = None


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def chain_hash(parent: int | None, tokens: Tokens[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV budget holds no block at all; raise kv_cache_bytes or lower block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [NO_HASH] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block holding that prefix
        self.query_tokens = 0  # prompt tokens looked up in the cache (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of which found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens in all."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_allocate(self, table: list[int], num_tokens: int, hits: list[int] = ()) -> bool:
        """Whether `table` (extended by the cached `hits`) can grow to `num_tokens` tokens. A hit
        that sits in the free list is taken from it, so it counts against the free blocks too."""
        taken_from_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        need = max(0, blocks_for(num_tokens, self.block_size) - len(table) - len(hits))
        return need + taken_from_free <= len(self.free_blocks)

    def allocate(self, table: list[int], num_tokens: int) -> list[int]:
        """Grow `table` (in place) to hold `num_tokens` tokens; returns the blocks added."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free_blocks)} free")
        new = [self._take_free() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, table: list[int]) -> None:
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        table.clear()

    def _take_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        self._forget(block)
        self.ref_counts[block] = 1
        return block

    def _forget(self, block: int) -> None:
        h = self.block_hashes[block]
        if h is not NO_HASH and self.cached.get(h) == block:
            del self.cached[h]
        self.block_hashes[block], self.block_tokens[block] = NO_HASH, None

    # -- prefix caching ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `token_ids`, leaving at least its last
        token to compute (its logits are needed). Not yet taken: see `take_hits`."""
        if not self.enable_caching:
            return []
        hits, parent, bs = [], None, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, tokens)
            block = self.cached.get(parent)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append(block)
        return hits

    def take_hits(self, table: list[int], hits: list[int], num_prompt_tokens: int) -> None:
        """Start an empty table with the cached blocks `hits` and count the lookup."""
        assert not table, "cached blocks start a table"
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        table.extend(hits)
        if self.enable_caching:
            self.query_tokens += num_prompt_tokens
            self.hit_tokens += len(hits) * self.block_size

    def register(self, table: list[int], hashes: list[int], token_ids: list[int], num_tokens: int,
                 unknown_token: int) -> None:
        """Make the full blocks among the first `num_tokens` tokens findable; `hashes` (the
        sequence's own, extended in place) holds the chain so far. A block that holds a token
        still unknown (being sampled) stops the chain until it is known."""
        if not self.enable_caching:
            return
        bs = self.block_size
        while len(hashes) < num_tokens // bs:
            i = len(hashes)
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            if unknown_token in tokens:
                return
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = table[i]
            if self.block_hashes[block] is NO_HASH:
                self.block_hashes[block], self.block_tokens[block] = h, tokens
                self.cached.setdefault(h, block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a failed step, whose writes cannot be trusted)."""
        for block in range(self.num_blocks):
            self._forget(block)
