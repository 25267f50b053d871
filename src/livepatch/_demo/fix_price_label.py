"""Live fix for the demo shop: prices always show two decimals ("$2.50", not "$2.5")."""

import livepatch

patch = livepatch.Patch("fix-price-label", description="show prices with two decimals")


@patch.function(
    "shop:price_label",
    expect='''def price_label(cents: int) -> str:
    """How a price is shown to customers."""
    return f"${cents / 100}"  # the bug: 250 cents shows as "$2.5"
''',
)
def price_label(cents: int) -> str:
    """How a price is shown to customers."""
    return f"${cents // 100}.{cents % 100:02d}"
