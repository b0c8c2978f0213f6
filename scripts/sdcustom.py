"""Entry file the WebUI executes at start (docs/host-formats.md#extension-loading): the Customize tab, its settings and
its API routes.

Only registration lives here; the behaviour is in the `lib_sdcustom` package next to this folder (importable
now, while the WebUI has the extension root on sys.path), behind its one host adapter, `host/a1111.py`.
"""

from modules import script_callbacks

from lib_sdcustom.host import a1111

script_callbacks.on_ui_tabs(a1111.ui_tabs)
script_callbacks.on_ui_settings(a1111.register_settings)
script_callbacks.on_app_started(a1111.app_started)
