"""Which inventory store a connector config or ``--db`` names: a SQLite file or PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

from .config import is_postgres_url
from .pgstore import PgInventory
from .store import Inventory

__all__ = ["AnyInventory", "open_inventory"]

AnyInventory = Inventory | PgInventory


def open_inventory(target: str | os.PathLike[str], *, create: bool = True) -> AnyInventory:
    """``postgresql://...`` -> :class:`PgInventory` (needs ``easgate[cluster]``), else the SQLite file.

    Raises :class:`~easgate.connector.store.InventoryError` with a one-line message.
    """
    if is_postgres_url(target):
        return PgInventory(str(target).strip(), create=create)
    return Inventory(Path(target), create=create)
