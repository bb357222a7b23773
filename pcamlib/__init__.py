"""pcamlib: a reproducible PatchCamelyon (PCam) study toolkit."""

__version__ = "0.1.0"
