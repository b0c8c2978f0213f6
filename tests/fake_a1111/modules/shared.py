"""Fake `modules.shared`: `state` (shared_state.State), `opts`, `cmd_opts`, `sd_model`, `OptionInfo`."""

from types import SimpleNamespace

CALLS = []  # (name, args) of every host function our code called; fake_host.CALLS is the same list


class State:
    """The fields and methods of modules/shared_state.py::State that trainers use; assignments are logged."""

    def __init__(self):
        object.__setattr__(self, "log", [])
        self.reset()

    def reset(self):
        for name, value in dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_no=0, job_count=0,
                                sampling_step=0, sampling_steps=0, current_image=None, id_live_preview=0,
                                textinfo=None).items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        self.log.append((name, value))
        object.__setattr__(self, name, value)

    def begin(self, job="(unknown)"):
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job_count, self.job_no, self.job, self.textinfo = -1, 0, job, None
        CALLS.append(("state.begin", job))

    def end(self):
        self.job, self.job_count = "", 0
        CALLS.append(("state.end", None))

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {"CLIP_stop_at_last_layers": 1})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key in self.data:
            return self.data[key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


state = State()
opts = Options()
cmd_opts = SimpleNamespace()
sd_model = None
loaded_hypernetworks = []


def reload_hypernetworks():
    CALLS.append(("shared.reload_hypernetworks", None))
