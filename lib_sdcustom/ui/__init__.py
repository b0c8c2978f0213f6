"""The Customize tab, shared by the WebUI (through `host/a1111.py`) and the standalone server (`python -m lib_sdcustom.ui`)."""

from .tab import TabController, build_tab

__all__ = ["TabController", "build_tab"]
