"""Moderation and refusals through the stand-in WebUI, whose script runner, callbacks and extra
networks swallow exceptions exactly where the real WebUI v1.10.1 does (tests/webui_stub).

A refusal only counts if it fails the request the way the API reports it (``api_generate``:
status and body as ``modules/api/api.py`` builds them) and no image comes out; an enforced SPM
only counts if every user input leaves the enforced output unchanged or is refused.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from types import SimpleNamespace

import miniwebui
import pytest
import torch
from spm_helpers import hook_counts, random_spm

from lib_spm.errors import SPMError
from lib_spm.format.spm_file import LayerWeights
from lib_spm.hosts.webui.args import ApplyArgs, Choice
from lib_spm.runtime.moderation import Policy, opposition
from lib_spm.world.model import load_world

PROMPTS = ["a red circle", "a blue square on black"]
STEPS = 2


@pytest.fixture(scope="module")
def world():
    return load_world()


def args(*choices, enabled=True, ft=True, factor=1.0, metric="pooled_tokenuni"):
    return ApplyArgs(enabled, ft, factor, metric, tuple(Choice(n, s) for n, s in choices)).as_args()


@contextlib.contextmanager
def webui(world, tmp_path, **cmd_opts):
    """The stand-in WebUI with the script loaded; its SPM folder holds "circle", "circle_copy"
    (the same weights under another name), "anti" (their negation), "star" and "xl" (an SDXL SPM)."""
    models = tmp_path / "models"
    folder = models / "spm"
    folder.mkdir(parents=True)
    sd = miniwebui.WorldModel(world)
    unet = sd.model.diffusion_model
    circle = random_spm(unet, ["circle"], seed=1, std=0.3, name="circle")
    circle.save(folder / "circle.safetensors")
    replace(circle, metadata=replace(circle.metadata, name="circle_copy")).save(folder / "circle_copy.safetensors")
    anti = {k: LayerWeights(w.down, -w.up, w.alpha) for k, w in circle.layers.items()}
    replace(circle, layers=anti, metadata=replace(circle.metadata, name="anti", targets=["square"])).save(
        folder / "anti.safetensors")
    random_spm(unet, ["star"], seed=2, std=0.3, name="star").save(folder / "star.safetensors")
    replace(circle, metadata=replace(circle.metadata, arch="sdxl", name="xl")).save(folder / "xl.safetensors")
    mod, modules = miniwebui.load(models, **cmd_opts)
    modules.shared.sd_model = sd
    try:
        yield SimpleNamespace(mod=mod, modules=modules, sd=sd, unet=unet, script=mod.SPMScript(), folder=folder)
    finally:
        mod.ext().shutdown()
        miniwebui.unload()


def api(w, a, prompts=PROMPTS, **kw):
    return miniwebui.api_generate(w.mod, w.modules, w.script, a, prompts, steps=STEPS, **kw)


def ok(w, a, prompts=PROMPTS, **kw):
    status, body = api(w, a, prompts, **kw)
    assert status == 200, body
    return body


# -- the stand-in swallows where the WebUI does ------------------------------------------------------

class Raising:
    """A script that raises in every hook, like a broken extension."""

    filename = "broken.py"

    def before_process(self, p, *a):
        raise RuntimeError("broken before_process")

    def process_before_every_sampling(self, p, *a, **kw):
        raise RuntimeError("broken process_before_every_sampling")

    def postprocess(self, p, processed, *a):
        raise RuntimeError("broken postprocess")


def test_the_stand_in_swallows_script_callback_and_extra_network_errors(world, tmp_path):
    with webui(world, tmp_path) as w:
        w.modules.script_callbacks.on_cfg_denoiser(lambda params: 1 / 0)

        class BrokenNetwork(w.modules.extra_networks.ExtraNetwork):
            def activate(self, p, params_list):
                raise RuntimeError("broken activate")

        w.modules.extra_networks.register_extra_network(BrokenNetwork("broken"))
        body = ok(w, args(enabled=False), others=[(Raising(), [])])
        assert body["latents"].isfinite().all()  # the generation ran to the end regardless
        reported = "\n".join(m for m, _ in w.modules.errors.reported)
        for what in ("before_process", "process_before_every_sampling", "postprocess", "cfg_denoiser",
                     "activating extra network broken"):
            assert what in reported


# -- enforcement cannot be weakened ------------------------------------------------------------------

BYPASSES = [  # (accordion args, prompt suffix): each must be refused or leave the enforced output
    (args(("circle", -1.0)), ""),
    (args(("circle_copy", -1.0)), ""),
    (args(("star", -0.5)), ""),  # any negative strength, whatever the file is
    (args(enabled=False), " <spm:circle:-1>"),
    (args(enabled=False), " <spm:circle_copy:-1>"),
    (args(enabled=False), " <spm:circle_copy:-0.5> <spm:circle_copy:-0.5>"),
    (args(("anti", 1.0)), ""),  # the negated weights at a positive strength
    (args(enabled=False), " <spm:anti:1>"),
    (args(("circle", 0.0), ft=False, factor=0.0), ""),
]


def test_no_user_input_weakens_an_enforced_spm(world, tmp_path):
    with webui(world, tmp_path / "plain") as plain:
        bare = ok(plain, args(enabled=False))["latents"]
    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        enforced = ok(w, args(enabled=False))["latents"]
        assert (enforced - bare).abs().max() > 0.05  # the enforced SPM does act
        for a, suffix in BYPASSES:
            status, body = api(w, a, [p + suffix for p in PROMPTS])
            if status == 200:
                torch.testing.assert_close(body["latents"], enforced, rtol=0, atol=1e-5)
            else:
                assert status == 422 and ("negative strengths are refused" in body["errors"]
                                          or "undoes" in body["errors"]), body
        assert hook_counts(w.unet) == 2  # the guard only


def test_xyz_strength_cannot_go_negative_while_enforced(world, tmp_path):
    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        from modules import prompt_parser

        p = miniwebui.Processing(w.sd, PROMPTS, ["", ""], STEPS, prompt_parser)
        p.spm_xyz = {"model": "circle_copy", "strength": -1.0}
        w.script.before_process(p, *args(enabled=False))
        with pytest.raises(Exception, match="negative strengths are refused"):
            w.unet(torch.zeros(1, 12, 16, 16), torch.tensor([1]), context=torch.zeros(1, 77, 64))
        w.mod.ext().controller.end(p)


def test_lockdown_refuses_every_user_spm(world, tmp_path):
    with webui(world, tmp_path, spm_enforce="circle:1", spm_lockdown=True) as w:
        for a, suffix in [(args(("star", 1.0)), ""), (args(enabled=False), " <spm:star:1>")]:
            status, body = api(w, a, [p + suffix for p in PROMPTS])
            assert status == 422 and "turned off user SPMs" in body["errors"]
        assert "locked" in w.mod.ext().read_only and "Always applied" in w.mod.ext().locked_html()
        assert ok(w, args(enabled=False))["info"]["SPM enforced"] == "circle:1"


# -- refusal refuses -------------------------------------------------------------------------------

@pytest.mark.parametrize("enforce,message", [
    ("does_not_exist:1", "enforced SPM 'does_not_exist' cannot be used: no SPM named"),
    ("xl:1", "none of the enforced SPMs (xl) fits the loaded sd1 model"),
    ("circle:lots", "cannot be read"),
    ("circle:1,does_not_exist", "'does_not_exist' cannot be used"),  # one missing is enough
])
def test_an_enforced_spm_that_cannot_act_refuses_the_generation(world, tmp_path, caplog, enforce, message):
    with webui(world, tmp_path, spm_enforce=enforce) as w:
        assert w.mod.ext().controller.check_policy(w.sd)  # what start-up and every model load log
        finished = []
        handle = w.unet.register_forward_hook(lambda *a: finished.append(1))
        status, body = api(w, args(enabled=False))
        handle.remove()
        assert status == 503 and body["error"] == "ModerationUnavailable" and message in body["errors"], body
        assert "latents" not in body and finished == []  # refused at the first UNet call
        status, body = api(w, args(("star", 1.0)))  # user SPMs do not make it acceptable
        assert status == 503


def test_a_model_loaded_mid_request_keeps_the_request_and_the_enforcement(world, tmp_path):
    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        want = ok(w, args(("star", 1.0)))["latents"]
        other = miniwebui.WorldModel(world)  # a new model object, as a checkpoint override loads one
        body = ok(w, args(("star", 1.0)), load_model=other)
        torch.testing.assert_close(body["latents"], want, rtol=0, atol=1e-5)
        assert body["info"]["SPM"] == "star:1" and body["info"]["SPM enforced"] == "circle:1"


def test_unet_calls_outside_a_moderated_generation_are_refused(world, tmp_path):
    """A refiner, a model loaded mid-sampling or another extension running the UNet: the enforced
    SPMs are not on it, so it may not run."""
    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        ok(w, args(enabled=False))
        x = torch.zeros(1, 12, 16, 16)
        with pytest.raises(Exception, match="enforced SPMs are not attached"):
            w.unet(x, torch.tensor([1]), context=torch.zeros(1, 77, 64))
        with w.mod.ext().controller.trusted():  # our own training job
            assert w.unet(x, torch.tensor([1]), context=torch.zeros(1, 77, 64)).isfinite().all()


def test_an_enforced_spm_whose_hooks_do_not_run_refuses(world, tmp_path):
    """If the UNet's layers are bypassed (another extension replaced its computation), the probe
    on the enforced session's layer never fires and the call is refused."""
    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        ctl = w.mod.ext().controller
        from modules import prompt_parser

        p = miniwebui.Processing(w.sd, PROMPTS, ["", ""], STEPS, prompt_parser)
        w.script.before_process(p, *args(enabled=False))
        p.setup_conds()
        w.script.process_before_every_sampling(p, *args(enabled=False))
        enforced = next(a for a in ctl._gen.attached if a.enforced)
        enforced.probe.remove()  # as if the layer never ran
        with pytest.raises(Exception, match="did not act"):
            w.unet(torch.zeros(1, 12, 16, 16), torch.tensor([1]), context=torch.zeros(1, 77, 64))
        ctl.end(p)


# -- bad arguments fail the request, visibly --------------------------------------------------------

HEAD = [True, True, 1.0, "pooled_tokenuni"]
BAD = [
    (HEAD + ["does_not_exist", 1.0], "no SPM named 'does_not_exist'"),
    (HEAD + ["../circle", 1.0], "'..' part"),
    (HEAD + ["/etc/passwd", 1.0], "absolute path"),
    (HEAD + ["circle", float("nan")], "between"),
    (HEAD + ["circle", float("inf")], "between"),
    (HEAD + ["circle", "strong"], "must be a number"),
    (HEAD + ["circle", None], "must be a number, not NoneType"),
    (HEAD + ["circle", True], "must be a number, not bool"),
    (HEAD + ["circle", 100], "between -10 and 10"),
    (HEAD + ["xl", 1.0, "circle", 1e400], "between"),
    ([True, True, 1.0, "bogus"], "unknown FT metric"),
    ([True, True, float("nan")], "FT factor"),
    ([True, True, 1.0, None], "unknown FT metric"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_fail_the_request_naming_the_argument(world, tmp_path, bad, message):
    with webui(world, tmp_path) as w:
        before = {k: v.clone() for k, v in w.unet.state_dict().items()}
        status, body = api(w, bad)
        assert status == 422 and message in body["errors"], body
        assert str(w.folder) not in body["errors"]  # the server's paths stay on the server
        assert hook_counts(w.unet) == 0
        assert all(torch.equal(before[k], v) for k, v in w.unet.state_dict().items())


@pytest.mark.parametrize("tag,message", [
    ("<spm:circle:strong>", "strength in <spm:circle:...> must be a number"),
    ("<spm:circle:nan>", "between"),
    ("<spm:circle:1:2>", "3 parts"),
    ("<spm:../x:1>", "'..' part"),
])
def test_a_malformed_tag_refuses(world, tmp_path, tag, message):
    with webui(world, tmp_path) as w:
        status, body = api(w, args(enabled=False), [f"a red circle {tag}"])
        assert status == 422 and message in body["errors"], body


# -- infotext tells the truth ------------------------------------------------------------------------

def test_infotext_lists_exactly_what_acted(world, tmp_path):
    with webui(world, tmp_path, spm_enforce="star:0.5") as w:
        body = ok(w, args(("circle", 1.0), ("xl", 1.0)), [p + " <spm:circle:0.5> <spm:nothere>" for p in PROMPTS])
        info = body["info"]
        assert info["SPM"] == "circle:0.5"  # the tag's strength replaced the accordion's
        assert info["SPM enforced"] == "star:0.5"
        lib = w.mod.ext().library
        assert info["SPM hashes"] == f"star: {lib.get('star').short_hash}, circle: {lib.get('circle').short_hash}"
        assert info["SPM skipped"] == "xl: it is for sdxl, the loaded model is sd1; nothere: no such SPM file"
        assert any("'nothere' skipped" in c for c in body["comments"])
        pasted = ApplyArgs.from_infotext({**info, "Prompt": PROMPTS[0] + " <spm:circle:0.5> <spm:nothere>"})
        assert pasted is None  # circle came from a tag; the enforced star is never pasted


def test_policy_parsing_never_raises():
    assert Policy.parse("a:1, b").enforced[1].strength == 1.0
    for bad in ("a:-1", "a:x", "a:1,a:2", ":1"):
        pol = Policy.parse(bad)
        assert pol.enforcing and pol.error and bad in pol.error
    assert not Policy.parse(None).enforcing and not Policy.parse("  ").enforcing
    locked = Policy.parse(None, lockdown=True)  # no user SPMs, but nothing to enforce: generation runs
    assert not locked.enforcing
    with pytest.raises(SPMError, match="turned off user SPMs"):
        locked.check_user_strength("a", 1.0)
    with pytest.raises(SPMError, match="negative strengths"):
        Policy.parse("a").check_user_strength("b", -0.1)
    Policy.parse("a").check_user_strength("b", 0.5)


def test_opposition_measures_how_much_an_spm_undoes_another(world):
    unet = miniwebui.WorldModel(world).model.diffusion_model
    a = random_spm(unet, ["circle"], seed=1, std=0.3)
    b = random_spm(unet, ["star"], seed=2, std=0.3)
    neg = replace(a, layers={k: LayerWeights(w.down, -w.up, w.alpha) for k, w in a.layers.items()})
    assert opposition(unet, neg, a) == pytest.approx(1.0, rel=1e-4)
    assert opposition(unet, a, a) == pytest.approx(-1.0, rel=1e-4)
    assert abs(opposition(unet, b, a)) < 0.05


def test_one_extension_per_process_even_when_threads_race_for_it(world, tmp_path, monkeypatch):
    """At start-up the WebUI loads the model in a thread (on_model_loaded) while the main thread
    runs the UI callbacks: both ask for the Extension at once and must get the same one."""
    import threading
    import time

    from lib_spm.hosts.webui import extension as webui_ext

    with webui(world, tmp_path, spm_enforce="circle:1") as w:
        webui_ext.release()
        make = webui_ext.Extension.from_webui

        def slow():
            time.sleep(0.2)  # wide enough for the other thread to arrive while this one builds
            return make()

        monkeypatch.setattr(webui_ext.Extension, "from_webui", staticmethod(slow))
        got = []
        threads = [threading.Thread(target=lambda: got.append(w.mod.ext())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got[0] is got[1] is w.mod.ext()
        # and making it never waits for the model (the WebUI's sd_model property blocks while the
        # model loads, and the loading thread's callback waits for the Extension)
        webui_ext.release()
        monkeypatch.setattr(webui_ext.Extension, "from_webui", staticmethod(make))
        real = sys.modules["modules.shared"]

        class Loading:  # the WebUI's shared while its model loads
            def __getattr__(self, name):
                return getattr(real, name)

            @property
            def sd_model(self):
                raise AssertionError("making the Extension read shared.sd_model")

        monkeypatch.setitem(sys.modules, "modules.shared", Loading())
        assert webui_ext.extension().policy.enforced[0].name == "circle"


def test_an_ungated_spm_is_labelled_where_it_acts(world, tmp_path):
    with webui(world, tmp_path) as w:
        random_spm(w.unet, [], seed=3, std=0.3, name="everything").save(w.folder / "everything.safetensors")
        body = ok(w, args(("everything", 1.0)))
        assert body["info"]["SPM"] == "everything:1" and body["info"]["SPM ungated"] == "everything"
        assert any("no target concepts" in c and "ungated" in c for c in body["comments"])
        assert "ungated" in w.mod.ext().describe(["everything"])

