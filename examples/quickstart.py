"""The README example: patch a live method, call it through a stored bound method, revert."""

import sys
import textwrap
import types

import livepatch

# A "running service": module shop.cart with a bug (negative quantities accepted).
cart_src = textwrap.dedent('''
    class Cart:
        def __init__(self):
            self.items = {}
        def add(self, item, qty=1):
            self.items[item] = self.items.get(item, 0) + qty
            return self.items[item]
''')
shop = types.ModuleType("shop_cart")
sys.modules["shop_cart"] = shop
exec(compile(cart_src, "shop_cart.py", "exec"), shop.__dict__)
cart = shop.Cart()
add_item = cart.add  # a bound method stored somewhere, e.g. as a callback

patch = livepatch.Patch("fix-1234", description="reject negative quantities")

@patch.function("shop_cart:Cart.add", expect='''
    def add(self, item, qty=1):
        self.items[item] = self.items.get(item, 0) + qty
        return self.items[item]
''')
def add(self, item, qty=1):
    if qty < 0:
        raise ValueError("qty must be >= 0")
    self.items[item] = self.items.get(item, 0) + qty
    return self.items[item]

livepatch.apply(patch)  # verify, transition (hybrid), finalize
try:
    add_item("apple", -5)  # the stored bound method runs the new code
except ValueError as exc:
    print("patched:", exc)
print([p.name for p in livepatch.patches()])
livepatch.revert("fix-1234")
print("reverted:", add_item("apple", -5))
