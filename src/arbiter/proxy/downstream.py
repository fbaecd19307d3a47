"""What the relay needs of a call's way back to its agent (``call_channel.py`` implements it).

Its own module, free of the pipeline, so that ``pipeline.py`` (``CallContext.downstream``) and ``relay.py``
can name it without importing what implements it.
"""

from __future__ import annotations

from typing import Any, Protocol


class Downstream(Protocol):
    async def message(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Take one message the upstream streamed for the call that is not its response: a notification
        (relayed to the agent, or dropped; returns None) or a request from the upstream (returns the
        JSON-RPC response to send back to the upstream)."""
        ...
