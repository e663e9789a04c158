"""Keyset pages of the listings (runs, audit): newest first by (time, id), a page being
the rows strictly before the last one of the previous page, so rows that arrive while a
client pages never shift what it has not read yet (no duplicates, no gaps)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Before:
    """Where the next page starts: rows older than (at, id)."""

    at: dt.datetime
    id: uuid.UUID | int


def compose(statement: str, fragments: Iterable[str], **more: str) -> str:
    """`statement` with its {conditions} (and other named slots) filled from fixed
    fragments of store/queries.py: never from request text, which travels as parameters."""
    return statement.format(conditions="".join(fragments), **more)


def bounds(since: dt.datetime | None, until: dt.datetime | None, before: Before | None,
           where: dict[str, str], params: dict[str, Any]) -> list[str]:
    """The time-range and keyset fragments of a listing (`where` names its own
    LIST_*_WHERE_SINCE/UNTIL/BEFORE fragments) and their parameters, added to `params`."""
    fragments = []
    if since is not None:
        fragments.append(where["since"])
        params["since"] = since
    if until is not None:
        fragments.append(where["until"])
        params["until"] = until
    if before is not None:
        fragments.append(where["before"])
        params["before_at"], params["before_id"] = before.at, before.id
    return fragments
