"""Hands out fixed-size blocks of the paged KV cache (ids only; the tensors live in the model runner)."""
from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV budget holds no block at all; raise kv_cache_bytes or lower block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens in all."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(table))

    def can_allocate(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self.free_blocks)

    def allocate(self, table: list[int], num_tokens: int) -> list[int]:
        """Grow `table` (in place) to hold `num_tokens` tokens; returns the blocks added."""
        need = self.blocks_needed(table, num_tokens)
        if need == 0:
            return []
        if need > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self.free_blocks)} free")
        new = [self.free_blocks.popleft() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, table: list[int]) -> None:
        self.free_blocks.extend(table)
        table.clear()
