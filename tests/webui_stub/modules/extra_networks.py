import re

registry = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [i for i in self.items if "=" not in i]
        self.named = dict(i.split("=", 1) for i in self.items if "=" in i)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(network):
    registry[network.name] = network


TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    found = {}

    def take(m):
        found.setdefault(m.group(1), []).append(ExtraNetworkParams(m.group(2).split(":")))
        return ""

    return TAG.sub(take, prompt), found


def parse_prompts(prompts):
    """Tags are removed from every prompt; the batch takes the first prompt's (as the WebUI does)."""
    res, data = [], None
    for prompt in prompts:
        text, found = parse_prompt(prompt)
        if data is None:
            data = found
        res.append(text)
    return res, data or {}


def activate(p, data):
    """Every registered network is called, with [] when the prompt does not name it."""
    for name, network in registry.items():
        network.activate(p, data.get(name, []))


def deactivate(p, data):
    for name, network in registry.items():
        network.deactivate(p)
