"""Entry file the WebUI executes at start (docs/host-formats.md#extension-loading): the Customize tab, its settings and
its API routes.

Only registration lives here, with the only imports of the WebUI's `modules`: the behaviour is in the
`lib_sdcustom` package next to this folder (importable now, while the WebUI has the extension root on sys.path),
behind its one host adapter, `host/a1111.py`, which works through the modules handed to it here.
"""

from modules import call_queue, paths, processing, script_callbacks, sd_hijack, sd_models, shared

from lib_sdcustom.host import a1111

a1111.connect(a1111.WebUIModules(shared=shared, paths=paths, sd_models=sd_models, sd_hijack=sd_hijack,
                                 processing=processing, call_queue=call_queue))
script_callbacks.on_ui_tabs(a1111.ui_tabs)
script_callbacks.on_ui_settings(a1111.register_settings)
script_callbacks.on_app_started(a1111.app_started)
