"""Fake `modules.paths`: set by `fake_host.configure`."""
script_path = ""
data_path = ""
models_path = ""
