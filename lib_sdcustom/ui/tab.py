"""The Customize tab: a builder (gradio layout and wiring) over `TabController` (plain Python callbacks).

The controller holds every behaviour, so tests call it directly; the builder only lays out widgets. Live
progress comes from a hidden "poll" button that `javascript/sdcustom.js` clicks every second while the tab
is visible: that works in the same way in gradio 3 and 4+, inside the WebUI and standalone, where
`every=`/`gr.Timer` do not.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import RunConfig
from ..errors import DatasetError, UserFacingError
from ..host.base import HostFacts, output_kind
from ..methods.registry import METHOD_SECTIONS, method_class
from ..microworld.install import install_into_host
from ..run import presets
from ..run.folders import clear_finished, run_folders
from ..run.plan import scan_images
from ..run.manager import RunManager, RunStatus
from . import compat, form, plan, render

logger = logging.getLogger(__name__)

_THUMBNAIL_SIDE = 160
_PREVIEWS_SHOWN = 8
_NO_CHANGE = object()  # "leave this widget as it is": the builder swaps it for gr.update()


def _thumbnails(paths: Sequence[Path], side: int = _THUMBNAIL_SIDE) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((side, side))
                images.append(image)
        except OSError as error:  # a preview that vanished or is still being written: skip it this time
            logger.debug("thumbnail of %s failed: %s", path, error)
    return images


class TabController:
    """The tab's callbacks. `form_values` is always (method, checkpoint, folder, name, token, class, *options)."""

    def __init__(self, facts: HostFacts, manager: RunManager) -> None:
        self.facts = facts
        self.manager = manager
        self.host = manager.host
        self.fields = form.option_fields()

    # ----- building a config -----
    def config(self, method: str, checkpoint: str, folder: str, name: str, token: str, subject_class: str,
               *values: Any, subject: bool = True) -> RunConfig:
        return form.config_from_form(method, folder, name, token, subject_class, self.fields, values, subject=subject)

    def _prepared(self, *form_values: Any) -> RunConfig:
        config = self.config(*form_values)
        self.host.prepare(config, form_values[1] or "")
        return config

    # ----- before training -----
    def _planned_config(self, *form_values: Any) -> RunConfig:
        """The form's config as the run will train it, with the token and class applied when a token is given
        (uncaptioned images train with it, and the class prompt decides prior preservation); no token is no
        error before Train."""
        config = self.config(*form_values, subject=False)
        method, token, subject_class = form_values[0], form_values[4], form_values[5]
        if form.uses_token(method) and (token or "").strip():
            form.apply_subject(config, token, subject_class)
        return config

    def check_folder(self, *form_values: Any) -> tuple[str, list[Any], str, int]:
        """(dataset panel, thumbnails, plan panel, images per epoch) for the folder in the form."""
        try:
            config = self._planned_config(*form_values)
            if not config.data.data:
                raise DatasetError("No image folder given.", "Type the path of the folder that holds your pictures.")
            self.host.check_paths(config)

            summary = plan.summarize_dataset(scan_images(config, self.manager.scans))
        except UserFacingError as error:
            return render.error_html(error.problem, error.fix), [], self.plan(0, *form_values), 0
        return (plan.dataset_html(summary), _thumbnails(summary.thumbnails), self.plan(summary.seen_per_epoch, *form_values),
                summary.seen_per_epoch)

    def plan(self, seen_per_epoch: int | None, *form_values: Any) -> str:
        try:
            config = self._planned_config(*form_values)
        except UserFacingError as error:
            return render.error_html(error.problem, error.fix)
        model = self.host.model_label()
        where = self.facts.output_dirs[output_kind(config.method)]
        header = f"<div class='sdcustom-where'>Result goes to {render._e(str(where))}" + (
            f"; trains on the loaded checkpoint <b>{render._e(model)}</b>" if model else "") + "</div>"
        checkpoint = form_values[1] or ""
        try:
            body = plan.plan_html(config, seen_per_epoch or None, self.host.base_parameters(checkpoint),
                                  self.host.model_kind(checkpoint))
        except UserFacingError as error:  # a setting the estimate reads is malformed (a hypernetwork's layer sizes)
            body = render.error_html(error.problem, error.fix)
        return header + body

    def method_changed(self, method: str) -> list[bool]:
        """Visibility of the token box and of each method-specific accordion (in `method_sections` order)."""
        return [form.uses_token(method)] + [form.section_visible(section, method) for section in self.method_sections]

    @property
    def method_sections(self) -> list[str]:
        return [section for section in METHOD_SECTIONS if any(f.section == section for f in self.fields)]

    # ----- training -----
    def busy_html(self) -> str:
        """'' when no run holds the slot; else which run does and who started it. Said at the click, because a
        Train call made now would wait silently in the host's queue behind that run."""
        status = self.manager.current()
        if status is None or not status.active:
            return ""
        return render.error_html(
            f"A training is already running: {status.name} ({status.method}), started from {status.origin}, "
            f"step {status.step}/{status.total_steps}.",
            "Wait until it finishes (its progress shows below) or press Cancel, then press Train again.")

    def guarded(self, queued_train: Callable[..., Any]) -> Callable[..., Any]:
        """The Train callback: the busy message at once when a run is active, else the queued training."""
        @functools.wraps(queued_train)
        def train_unless_busy(*values: Any) -> Any:
            busy = self.busy_html()
            return [busy] if busy else queued_train(*values)

        return train_unless_busy

    def train(self, task_id: str, *form_values: Any) -> list[str]:
        """The Train button (wrapped in the host's GPU queue call): blocks until the run ends."""
        try:
            config = self._prepared(*form_values)
            status = self.manager.run(config)
        except UserFacingError as error:
            return [render.error_html(error.problem, error.fix)]
        return [render.result_html(status)]

    # ----- run folders and the micro-world model -----
    def runs_html(self) -> str:
        root = self.facts.runs_dir
        return render.runs_html(root, run_folders(root)) if root is not None else ""

    def clear_runs(self) -> tuple[str, str]:
        """(message, runs panel): deletes the finished run folders, never the running one's."""
        status = self.manager.current()
        active = [Path(status.run_dir)] if status and status.active and status.run_dir else []
        cleared = clear_finished(self.facts.runs_dir, active) if self.facts.runs_dir is not None else []
        freed = sum(folder.size for folder in cleared)
        return render.notice_html(f"Cleared {len(cleared)} finished run folder(s), {render.size(freed)}."), self.runs_html()

    def install_micro_model(self) -> str:
        try:
            installed = install_into_host(self.host)
        except UserFacingError as error:
            return render.error_html(error.problem, error.fix)
        return render.notice_html(installed.message())

    def cancel(self) -> str:
        if self.manager.cancel():
            return render.notice_html("Cancelling: training stops after the current step and saves its state.")
        return render.notice_html("Nothing is training.")

    def poll(self, seen: str) -> tuple[str, Any, Any, Any, Any, Any]:
        """(state key, progress, chart, previews, result, run folders); `_NO_CHANGE` where nothing changed since
        `seen` (the page's first poll sends '', so a page opened later still gets the current figures)."""
        status = self.manager.current()
        key = f"{status.id}:{status.revision}" if status else "none"
        if key == seen:
            return key, _NO_CHANGE, _NO_CHANGE, _NO_CHANGE, _NO_CHANGE, _NO_CHANGE
        return (key, render.progress_html(status), render.loss_chart_svg(status.losses if status else []),
                _thumbnails([Path(p) for p in status.previews[-_PREVIEWS_SHOWN:]], 512) if status else [],
                render.result_html(status) if status and not status.active else _NO_CHANGE,
                _NO_CHANGE if status and status.active else self.runs_html())

    # ----- presets -----
    def save_preset(self, preset: str, *form_values: Any) -> tuple[str, list[str]]:
        try:
            config = self.config(*form_values, subject=False)
            path = presets.save_preset(self.facts.presets_dir, preset, config)
        except UserFacingError as error:
            return render.error_html(error.problem, error.fix), self.preset_names()
        return render.notice_html(f"Saved preset {path}"), self.preset_names()

    def load_preset(self, preset: str) -> tuple[Any, ...]:
        """(method, folder, name, *options, message); `_NO_CHANGE` everywhere on failure."""
        try:
            config = presets.load_preset(self.facts.presets_dir, preset or "")
        except UserFacingError as error:
            return (_NO_CHANGE,) * (3 + len(self.fields)) + (render.error_html(error.problem, error.fix),)
        return (config.method, config.data.data, config.output.name, *form.form_values(config, self.fields),
                render.notice_html(f"Loaded preset {preset}"))

    def delete_preset(self, preset: str) -> tuple[str, list[str]]:
        try:
            presets.delete_preset(self.facts.presets_dir, preset or "")
        except UserFacingError as error:
            return render.error_html(error.problem, error.fix), self.preset_names()
        return render.notice_html(f"Deleted preset {preset}"), self.preset_names()

    def preset_names(self) -> list[str]:
        return presets.list_presets(self.facts.presets_dir)

    def status(self) -> RunStatus | None:
        return self.manager.current()


def _widget(gr: Any, field: form.OptionField, value: Any) -> Any:
    common = {"label": field.label, "info": field.help, "elem_id": f"sdcustom_opt_{field.section}_{field.name}"}
    if field.choices:
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    if field.kind is bool:
        return gr.Checkbox(value=value, **common)
    if field.kind in (int, float):
        return gr.Number(value=value, precision=0 if field.kind is int else None, **common)
    return gr.Textbox(value=value, **common)


def _updates(gr: Any, values: Sequence[Any]) -> list[Any]:
    return [gr.update() if value is _NO_CHANGE else value for value in values]


def build_tab(facts: HostFacts, manager: RunManager) -> Any:
    """The tab as a gr.Blocks; the host renders it (WebUI) or launches it (standalone)."""
    import gradio as gr

    control = TabController(facts, manager)
    defaults = {"training.sample_every": facts.preview_every, "model.clip_skip": facts.default_clip_skip}
    hidden = {"elem_classes": ["sdcustom-hidden"]}
    with gr.Blocks(**compat.blocks_kwargs(facts.gradio_css)) as tab:
        if facts.missing_requirements:
            needed = " ".join(facts.missing_requirements)
            gr.HTML(render.error_html(f"Missing Python packages: {needed}. Training will not start until they are installed.",
                                      f"Run in the WebUI's Python environment: python -m pip install {needed} "
                                      "(then restart the WebUI)."))
        with gr.Row(elem_id="sdcustom_panel"):
            with gr.Column(scale=3):
                method = gr.Dropdown(choices=compat.labelled_choices(form.METHOD_LABELS), value="lora", label="Method",
                                     elem_id="sdcustom_method", info=form.METHOD_HELP)
                if facts.checkpoints:
                    checkpoint = gr.Dropdown(choices=facts.checkpoints, value=facts.checkpoints[0], label="Base checkpoint",
                                             elem_id="sdcustom_checkpoint")
                else:
                    checkpoint = gr.Textbox(value="", **hidden)
                with gr.Row():
                    folder = gr.Textbox(label="Image folder", placeholder="/path/to/images (captions as same-name .txt)",
                                        elem_id="sdcustom_folder", scale=4)
                    check = gr.Button("Check folder", elem_id="sdcustom_check", scale=1)
                with gr.Row():
                    name = gr.Textbox(label="Name", placeholder="my_subject", elem_id="sdcustom_name",
                                      info="File name, and what you type in prompts.")
                    token = gr.Textbox(label="Token", placeholder="sks", elem_id="sdcustom_token",
                                       info="A rare word for your subject.")
                    subject_class = gr.Textbox(label="Class", placeholder="dog", elem_id="sdcustom_class",
                                               info="What it is (also the TI start words).")
                dataset_info = gr.HTML(elem_id="sdcustom_dataset")
                thumbnails = gr.Gallery(label="Images", columns=6, height=220, elem_id="sdcustom_thumbnails")
                plan_info = gr.HTML(elem_id="sdcustom_plan")
                seen = gr.State(0)
                widgets, accordions = [], {}
                for section in dict.fromkeys(field.section for field in control.fields):
                    visible = form.section_visible(section, "lora")
                    with gr.Accordion(form.SECTION_TITLES.get(section, section), open=False, visible=visible) as box:
                        for field in (f for f in control.fields if f.section == section):
                            widgets.append(_widget(gr, field, defaults.get(field.key, field.default)))
                    accordions[section] = box
                with gr.Row():
                    preset = gr.Dropdown(choices=control.preset_names(), label="Preset", elem_id="sdcustom_preset")
                    preset_name = gr.Textbox(label="Save as", placeholder="preset name", elem_id="sdcustom_preset_name")
                with gr.Row():
                    save = gr.Button("Save preset", elem_id="sdcustom_preset_save")
                    load = gr.Button("Load preset", elem_id="sdcustom_preset_load")
                    delete = gr.Button("Delete preset", elem_id="sdcustom_preset_delete")
                preset_message = gr.HTML(elem_id="sdcustom_preset_message")
            with gr.Column(scale=2):
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="sdcustom_train")
                    cancel = gr.Button("Cancel", elem_id="sdcustom_cancel")
                if facts.queue_note:
                    gr.HTML(render.notice_html(facts.queue_note))
                cancel_message = gr.HTML(elem_id="sdcustom_cancel_message")
                progress = gr.HTML(render.progress_html(None), elem_id="sdcustom_progress")
                chart = gr.HTML(render.loss_chart_svg([]), elem_id="sdcustom_chart")
                previews = gr.Gallery(label="Previews", columns=4, height=280, elem_id="sdcustom_previews")
                result = gr.HTML(render.result_html(None), elem_id="sdcustom_result")
                runs_info = gr.HTML(control.runs_html(), elem_id="sdcustom_runs")
                with gr.Row():
                    clear_runs = gr.Button("Clear finished runs", elem_id="sdcustom_clear_runs",
                                           visible=facts.runs_dir is not None)
                    install_model = gr.Button("Install the micro-world model", elem_id="sdcustom_install_micro")
                folder_message = gr.HTML(elem_id="sdcustom_folder_message")
        task_id = gr.Textbox(value="", **hidden)
        poll = gr.Button("poll", elem_id="sdcustom_poll", **hidden)
        poll_state = gr.State("")

        form_inputs = [method, checkpoint, folder, name, token, subject_class, *widgets]
        sections = control.method_sections

        def method_updates(value: str) -> list[Any]:
            shown = control.method_changed(value)
            return [gr.update(visible=flag) for flag in shown]

        method.change(method_updates, inputs=[method], outputs=[token] + [accordions[s] for s in sections], queue=False)
        for trigger in (check.click, folder.submit):
            trigger(control.check_folder, inputs=form_inputs, outputs=[dataset_info, thumbnails, plan_info, seen])
        replan_keys = {"training.steps", "training.batch_size", "training.gradient_accumulation", "data.resolution",
                       "network.rank", "training.mixed_precision", "training.gradient_checkpointing",
                       "training.train_text_encoder", "training.fp8_base", "training.cache_text_encoder_outputs",
                       "optimizer.optimizer", "prior.prior_preservation",
                       "prior.class_prompt", "prior.class_data", "prior.style"}
        for field, widget in zip(control.fields, widgets):
            if field.key in replan_keys:  # typed values on blur where gradio has it: one event per edit
                typed = not (field.choices or field.kind is bool)
                trigger = getattr(widget, "blur", None) if typed else None
                trigger = trigger or widget.change
                trigger(control.plan, inputs=[seen, *form_inputs], outputs=[plan_info], queue=False)
        for changed in (method, checkpoint):
            changed.change(control.plan, inputs=[seen, *form_inputs], outputs=[plan_info], queue=False)

        train_call = control.guarded(control.host.wrap_tab_call(control.train, extra_outputs=[]))
        event = train.click(train_call, inputs=[task_id, *form_inputs], outputs=[result], **compat.js_kwargs(facts.train_js))
        if facts.after_train_js:
            event.then(None, None, None, **compat.js_kwargs(facts.after_train_js))
        event.then(control.runs_html, inputs=[], outputs=[runs_info], queue=False)
        clear_runs.click(control.clear_runs, inputs=[], outputs=[folder_message, runs_info], queue=False)
        install_model.click(control.install_micro_model, inputs=[], outputs=[folder_message], queue=False)
        cancel.click(control.cancel, inputs=[], outputs=[cancel_message], queue=False)
        poll.click(lambda key: _updates(gr, control.poll(key)), inputs=[poll_state],
                   outputs=[poll_state, progress, chart, previews, result, runs_info], queue=False)

        def preset_list(message_and_names: tuple[str, list[str]], selected: str) -> list[Any]:
            message, names = message_and_names
            return [message, gr.update(choices=names, value=selected if selected in names else None)]

        save.click(lambda chosen, *values: preset_list(control.save_preset(chosen, *values), chosen),
                   inputs=[preset_name, *form_inputs], outputs=[preset_message, preset], queue=False)
        delete.click(lambda chosen: preset_list(control.delete_preset(chosen), ""), inputs=[preset],
                     outputs=[preset_message, preset], queue=False)
        load.click(lambda chosen: _updates(gr, control.load_preset(chosen)), inputs=[preset],
                   outputs=[method, folder, name, *widgets, preset_message], queue=False)
    tab.sdcustom_controller = control  # for the host's tests: the callbacks behind the widgets
    return tab
