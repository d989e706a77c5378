"""sd-webui-spm: the WebUI side. Subclasses and callbacks only; the work is in ``lib_spm``.

- "Concept erasure (SPM)" accordion in txt2img/img2img (an always-on script), API args included
- ``<spm:name:strength>`` prompt tags and their extra-network cards
- infotext written and pasted back, an XYZ plot axis, settings, ``/spm/v1/*`` API routes
- the SPM tab (Train / Manage / Merge / Test)
"""

from __future__ import annotations

from modules import extra_networks, script_callbacks, scripts, shared, ui_extra_networks

from lib_spm.hosts.webui import extension
from lib_spm.hosts.webui.args import SLOTS, ApplyArgs
from lib_spm.runtime import functional

ext = extension.extension  # the process's one Extension, however often the WebUI runs this file


class SPMScript(scripts.Script):
    def title(self):
        return "Concept erasure (SPM)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr  # the UI's imports wait for the UI: generation (and its tests) never need them
        from modules.ui_components import InputAccordion

        d = ext().default_args()
        names = ["None"] + ext().names()
        user_spms = not ext().policy.lockdown  # locked: the controls stay (the args keep their layout), hidden
        locked = ext().locked_html()
        with InputAccordion(False, label=self.title(), elem_id=self.elem_id("spm")) as enabled:
            gr.HTML(locked, elem_id=self.elem_id("spm_locked"), visible=bool(locked))
            with gr.Row(visible=user_spms):
                ft = gr.Checkbox(d["ft"], label="Facilitated Transport: act only on prompts that mention the concept",
                                 elem_id=self.elem_id("spm_ft"))
                factor = gr.Slider(0.0, 4.0, value=d["factor"], step=0.05, label="FT factor",
                                   elem_id=self.elem_id("spm_ft_factor"))
                metric = gr.Dropdown(list(functional.METRICS), value=d["metric"], label="FT metric",
                                     elem_id=self.elem_id("spm_ft_metric"))
            slots = []
            for i in range(SLOTS):
                with gr.Row(elem_classes=["spm-slot"], visible=user_spms):
                    name = gr.Dropdown(names, value="None", label=f"SPM {i + 1}", elem_id=self.elem_id(f"spm_name_{i}"))
                    strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength",
                                         elem_id=self.elem_id(f"spm_strength_{i}"))
                slots += [name, strength]
            with gr.Row(visible=user_spms):
                refresh = gr.Button("\U0001f504 Refresh SPM list", elem_classes=["spm-refresh"], size="sm")
            info = gr.HTML(elem_id=self.elem_id("spm_info"))
        name_boxes = slots[0::2]
        for box in name_boxes:
            box.change(fn=lambda *ns: ext().describe(ns), inputs=name_boxes, outputs=[info], show_progress=False)

        def refreshed():
            choices = ["None"] + ext().names()
            return [gr.update(choices=choices) for _ in name_boxes]

        refresh.click(fn=refreshed, inputs=[], outputs=name_boxes)

        def pasted(i):
            return lambda params: (ApplyArgs.from_infotext(params) or ApplyArgs()).as_args()[i]

        components = [enabled, ft, factor, metric] + slots
        self.infotext_fields = [(c, pasted(i)) for i, c in enumerate(components)]
        self.paste_field_names = []
        return components

    # The WebUI swallows what these raise; the controller turns refusals into an error raised
    # inside the UNet call instead (lib_spm/hosts/webui/controller.py).
    def before_process(self, p, *args):
        ext().controller.begin(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        ext().controller.before_sampling(p)

    def post_sample(self, p, ps, *args):
        ext().controller.after_sampling(p)

    def postprocess(self, p, processed, *args):
        ext().controller.end(p)


class ExtraNetworkSPM(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__(extension.TAG)

    def activate(self, p, params_list):
        default = float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0))
        ext().controller.set_tags(p, params_list, default)

    def deactivate(self, p):
        pass  # sessions end with the sampling; nothing to undo here


class ExtraNetworksPageSPM(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("SPM")

    def refresh(self):
        ext().library.entries(refresh=True)

    def create_item(self, name, index=None, enable_filter=True):
        return ext().card(self, name, index, ui_extra_networks.quote_js, "opts.extra_networks_default_multiplier")

    def list_items(self):
        for index, name in enumerate(ext().names()):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [str(ext().library.root)]


def on_before_ui():
    extra_networks.register_extra_network(ExtraNetworkSPM())
    ui_extra_networks.register_page(ExtraNetworksPageSPM())
    _add_xyz_axes()


def _add_xyz_axes():
    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return

    def setter(key, kind):
        def apply(p, x, xs):
            p.spm_xyz = {**(getattr(p, "spm_xyz", None) or {}), key: kind(x)}
        return apply

    xyz.axis_options.extend([
        xyz.AxisOption("[SPM] Strength", float, setter("strength", float)),
        xyz.AxisOption("[SPM] Model", str, setter("model", str), choices=lambda: ext().names()),
        xyz.AxisOption("[SPM] FT factor", float, setter("factor", float)),
    ])


def on_ui_settings():
    import gradio as gr

    section = extension.SECTION
    shared.opts.add_option("spm_ft_default", shared.OptionInfo(
        True, "Facilitated Transport on by default", section=section))
    shared.opts.add_option("spm_ft_factor", shared.OptionInfo(
        1.0, "Default FT factor", gr.Slider, {"minimum": 0.0, "maximum": 4.0, "step": 0.05}, section=section))
    shared.opts.add_option("spm_ft_metric", shared.OptionInfo(
        "pooled_tokenuni", "Default FT metric", gr.Dropdown, {"choices": list(functional.METRICS)}, section=section))


def on_ui_tabs():
    from lib_spm.hosts.webui.tab import WebUIHost
    from lib_spm.ui.tab import build_tab

    return [(build_tab(WebUIHost(ext()), read_only=ext().read_only), "SPM", "spm")]


def on_app_started(demo, app):
    deps = extension.api_auth_dependency(shared.cmd_opts)
    app.add_api_route("/spm/v1/models", lambda: ext().api_list(), methods=["GET"], dependencies=deps)
    app.add_api_route("/spm/v1/gates", gates_route, methods=["POST"], dependencies=deps)


def gates_route(body: dict):
    """The Test panel's table: ``{"prompts": [...], "spms": [...], "ft", "factor", "metric"}``."""
    return extension.answer(lambda: ext().api_gates(body))


script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_cfg_denoiser(lambda params: ext().controller.on_cfg_denoiser(params))
script_callbacks.on_model_loaded(lambda sd_model: ext().controller.model_changed(sd_model))
script_callbacks.on_script_unloaded(extension.release)
