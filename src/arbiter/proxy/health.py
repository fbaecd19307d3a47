"""Which upstreams are down, in one place.

The pool writes it (what each upstream's current connection last learnt: a failed connect or a broken
connection makes it down, the next connect makes it up); everything else reads it: the catalog (a down
upstream's entries leave the lists but still route, so a call names it unavailable rather than
unknown), the registry's status and recovery sweep, ``/readyz`` and the admin API. ``version`` changes
whenever the set does, so a reader that caches what it derived from it (the catalog's views) knows when
to derive again without being told.
"""

from __future__ import annotations


class Health:
    def __init__(self) -> None:
        self._down: set[str] = set()
        self.version = 0

    def mark(self, upstream: str, up: bool) -> None:
        if up == (upstream not in self._down):
            return
        if up:
            self._down.discard(upstream)
        else:
            self._down.add(upstream)
        self.version += 1

    def forget(self, upstream: str) -> None:
        """An upstream no longer served: nothing is known about a later one of that name."""
        self.mark(upstream, True)

    def up(self, upstream: str) -> bool:
        return upstream not in self._down

    def down(self) -> list[str]:
        return sorted(self._down)
