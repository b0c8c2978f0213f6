"""The Customize tab, shared by the WebUI (through `host_a1111`) and the standalone server (`python -m lib_sdcustom.ui`)."""

from .tab import TabController, build_tab

__all__ = ["TabController", "build_tab"]
