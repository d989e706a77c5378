import re

from modules import errors

registry = {}


class ExtraNetworkParams:
    def __init__(self, items=None):  # as the WebUI splits them: one "=" makes a named item
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


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
    """Every registered network is called, with [] when the prompt does not name it; what one
    raises is displayed and swallowed, as in the WebUI."""
    for name, network in registry.items():
        try:
            network.activate(p, data.get(name, []))
        except Exception as e:
            errors.display(e, f"activating extra network {name} with arguments {data.get(name, [])}")


def deactivate(p, data):
    for name, network in registry.items():
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {name}")
