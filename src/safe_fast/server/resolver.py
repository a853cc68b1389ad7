"""Built-in function resolvers for ``propose``."""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["create_id_based_function_resolver"]


def create_id_based_function_resolver(manager: Any) -> Callable[[str, str], Optional[Any]]:
    """Resolve ``functionId`` to the ShareData's function whose ``id`` matches.

    Functions without an id are never returned: keep them for internal use
    that must not be reachable over the wire.
    """

    def resolve(share_data_id: str, function_id: str) -> Optional[Any]:
        share_data = manager.get_share_data_by_id(share_data_id)
        if share_data is None:
            return None
        for function in share_data.functions:
            if function.id is not None and function.id == function_id:
                return function
        return None

    return resolve
