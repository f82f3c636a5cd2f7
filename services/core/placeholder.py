"""A servicer whose every RPC answers UNIMPLEMENTED through the shared error path.

Used by a service until its own issue builds it; delete the use (and then this module) when the last one lands.
"""

from __future__ import annotations

from typing import Any

from services.core.errors import unimplemented


def placeholder_servicer(base: type, service_name: str) -> Any:
    """An instance of a subclass of the generated `base` servicer whose methods all raise UNIMPLEMENTED."""

    def make(name: str):
        async def method(self: Any, request: Any, context: Any) -> Any:
            raise unimplemented(f"/{service_name}/{name}")

        return method

    names = [n for n in vars(base) if not n.startswith("_")]
    return type(f"Placeholder{base.__name__}", (base,), {n: make(n) for n in names})()
