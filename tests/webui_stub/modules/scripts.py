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
