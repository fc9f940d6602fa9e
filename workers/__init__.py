"""workers: see the README architecture section; this package is filled in by a later issue."""
