"""``modules.scripts`` (v1.10.1): the Script base class and the ScriptRunner's error handling.

As in the WebUI, the runner calls each script method inside ``try/except Exception`` and only
reports what it raises (``errors.report``): a script cannot stop a generation from these hooks.
"""
from modules import errors

AlwaysVisible = object()
scripts_data = []  # ScriptClassData(script_class, path, basedir, module) of loaded scripts


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def elem_id(self, item_id):
        return f"script_txt2img_spm_{item_id}"


class ScriptRunner:
    """The always-on scripts of one tab with their args laid end to end in ``p.script_args``."""

    def __init__(self, scripts_and_args):
        self.alwayson_scripts, args = [], []
        for script, script_args in scripts_and_args:
            script.args_from, script.args_to = len(args), len(args) + len(script_args)
            script.filename = getattr(script, "filename", None) or type(script).__module__
            args += list(script_args)
            self.alwayson_scripts.append(script)
        self.script_args = tuple(args)

    def _each(self, method, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            fn = getattr(script, method, None)
            if fn is None:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                fn(p, *extra, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def post_sample(self, p, ps):
        self._each("post_sample", p, ps)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
