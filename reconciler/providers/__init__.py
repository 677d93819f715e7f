"""Vendor providers: the only code that speaks HTTP. `factory` builds them from policy systems."""
