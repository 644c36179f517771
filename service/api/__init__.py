"""HTTP surface: thin routers; wire models in ``*_protocol``; logic in ``*_serving``."""
