"""Fake `modules.script_callbacks`: stores callbacks the way the host does and lets tests fire them."""

callbacks_ui_tabs = []
callbacks_ui_settings = []
callbacks_app_started = []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)


def ui_tabs_callback():
    """As the host: concatenate what every on_ui_tabs callback returns."""
    result = []
    for callback in callbacks_ui_tabs:
        result += callback() or []
    return result


def ui_settings_callback():
    for callback in callbacks_ui_settings:
        callback()


def app_started_callback(demo, app):
    for callback in callbacks_app_started:
        callback(demo, app)


def clear():
    for registry in (callbacks_ui_tabs, callbacks_ui_settings, callbacks_app_started):
        registry.clear()
