from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kw):
        self.default, self.label, self.component, self.component_args, self.section = default, label, component, component_args, section


class Options(SimpleNamespace):
    def add_option(self, key, info):
        self.data_labels = getattr(self, "data_labels", {})
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)


class State:
    def __init__(self):
        self.job, self.job_count, self.interrupted, self.stopping_generation = "", 0, False, False
        self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.began = []

    def begin(self, job="(unknown)"):
        self.job = job
        self.interrupted = False
        self.began.append(job)

    def end(self):
        self.job, self.job_count = "", 0


def reset():
    global opts, cmd_opts, state, sd_model
    opts = Options(batch_cond_uncond=True, pad_cond_uncond=False, pad_cond_uncond_v0=False, use_old_scheduling=False,
                   CLIP_stop_at_last_layers=1, extra_networks_default_multiplier=1.0, samples_format="png")
    cmd_opts = SimpleNamespace(spm_dir=None, spm_enforce=None, spm_lockdown=False, api_auth=None, ckpt_dir=None)
    state = State()
    sd_model = None


reset()
