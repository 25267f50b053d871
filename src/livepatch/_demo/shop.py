"""The demo shop's pricing code: `price_label` has the bug the demo fixes live."""

from __future__ import annotations

CATALOGUE = {"apple": 125, "pear": 250, "fig": 1999}


def price_label(cents: int) -> str:
    """How a price is shown to customers."""
    return f"${cents / 100}"  # the bug: 250 cents shows as "$2.5"


def quote(item: str, qty: int) -> dict[str, object]:
    cents = CATALOGUE[item] * qty
    return {"item": item, "qty": qty, "total": price_label(cents)}
