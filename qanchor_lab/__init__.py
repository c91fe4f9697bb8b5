"""qanchor_lab: Query-as-Anchor user representations, reimplemented for notebooks."""

__version__ = "0.1.0"
