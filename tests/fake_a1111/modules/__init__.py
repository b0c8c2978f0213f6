"""Fake `modules` package of the WebUI, for tests only (see ../README.md)."""
