"""Prompt prefixes kept in spare KV-cache slots, so a repeated system prompt or conversation is not recomputed.

Keys are whole prompts, and finished sequences' prompts with their replies (a conversation's next turn sends
both back); a lookup finds the stored entry sharing the longest prefix with a new prompt. Entries belong to a
scope (the API key a request came with): a prompt reuses only its own scope's entries, so no key can tell from
its response times what another key's requests said. Causal
attention makes the cached keys and values of positions 0..k-1 depend on tokens 0..k-1 alone, so reusing them
for any prompt that starts with those tokens is exact, up to the order of floating-point sums: a prompt run
in two chunks instead of one moved float32 logits by at most 4e-5 here (see docs/engine.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

MIN_REUSE = 16  # shorter matches are not worth a copy


class Keep(NamedTuple):
    """Where to copy an entry: its slot, and how many of its first positions the slot holds already."""

    slot: int
    start: int


class PrefixCache:
    """Entries in spare slots, least recently used first out, holding at most `tokens` positions together.

    `release` gives back the memory of a slot whose entry leaves (evicted, or its copy failed), so the budget
    bounds what the entries hold, not just what they hold now.
    """

    def __init__(
        self, slots: list[int], tokens: int | None = None, release: Callable[[int], None] | None = None
    ) -> None:
        self._free = list(slots)
        # slot -> (scope, tokens), least recently used first
        self._entries: OrderedDict[int, tuple[str | None, np.ndarray]] = OrderedDict()
        self._budget = tokens
        self._release = release

    @property
    def tokens(self) -> int:
        """Positions the entries hold together."""
        return sum(len(stored) for _, stored in self._entries.values())

    def lookup(self, prompt: list[int], scope: str | None = None) -> tuple[int, int] | None:
        """(slot, length) of the longest prefix of this prompt stored in its scope, or None."""
        best: tuple[int, int] | None = None
        tokens = np.asarray(prompt)
        for slot, (owner, stored) in self._entries.items():
            if owner != scope:
                continue
            n = min(len(stored), len(tokens))
            differ = np.flatnonzero(stored[:n] != tokens[:n])
            common = int(differ[0]) if differ.size else n
            if common >= MIN_REUSE and (best is None or common > best[1]):
                best = (slot, common)
        if best is not None:
            self._entries.move_to_end(best[0])
        return best

    def store(self, prompt: list[int], scope: str | None = None) -> Keep | None:
        """Where to copy this prompt's cache, or None to skip: the slot of a stored entry the prompt extends (a
        conversation's earlier turn, whose positions are there already), else a free one, else the least
        recently used one. Entries leave, least recently used first, until the budget holds the new one."""
        too_long = self._budget is not None and len(prompt) > self._budget
        if len(prompt) < MIN_REUSE or too_long or not (self._free or self._entries):
            return None
        tokens = np.asarray(prompt)
        extended, start = None, 0
        for slot, (owner, stored) in self._entries.items():
            if owner != scope:
                continue
            if len(stored) >= len(tokens) and np.array_equal(stored[: len(tokens)], tokens):
                self._entries.move_to_end(slot)
                return None  # already covered
            if extended is None and np.array_equal(tokens[: len(stored)], stored):
                extended, start = slot, len(stored)
        if extended is not None:
            del self._entries[extended]  # its positions are the new entry's first ones: nothing to give back
            slot = extended
        elif self._free:
            slot = self._free.pop()
        else:
            slot = self._evict()
        while self._budget is not None and self._entries and self.tokens + len(tokens) > self._budget:
            self._free.append(self._evict())
        self._entries[slot] = (scope, tokens)
        return Keep(slot, start)

    def forget(self, slot: int) -> None:
        """Drop the entry of this slot (its copy failed), leaving the slot free."""
        if self._entries.pop(slot, None) is not None:
            self._free.append(slot)
            if self._release is not None:
                self._release(slot)

    def _evict(self) -> int:
        """The least recently used entry's slot, its memory given back."""
        slot = self._entries.popitem(last=False)[0]
        if self._release is not None:
            self._release(slot)
        return slot
