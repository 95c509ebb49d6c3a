"""lavise_core: explain what a CNN has learned, filter by filter (no UI code here)."""

__version__ = "0.1.0"
