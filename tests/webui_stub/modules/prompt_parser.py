"""AND with ``:weight`` and ``[a:b:N]`` (integer N): what these tests use of the WebUI's parser."""
import re

EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):(\d+)\]")


def get_multicond_prompt_list(prompts):
    flat, index, res = [], {}, []
    for prompt in prompts:
        image = []
        for sub in re.split(r"\bAND\b", prompt):
            m = re.fullmatch(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", sub, re.S)
            text, weight = m.group(1), float(m.group(2) or 1.0)
            if text not in index:
                index[text] = len(flat)
                flat.append(text)
            image.append((index[text], weight))
        res.append(image)
    return res, flat, index


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    hires = hires_steps is not None and not use_old_scheduling
    steps, offset = (hires_steps, base_steps) if hires else (base_steps, 0)

    def when(m):
        return min(steps, int(m.group(3)) - offset)

    out = []
    for p in prompts:
        ends = sorted({steps} | {when(m) for m in EDIT.finditer(p) if when(m) >= 1})
        out.append([[e, EDIT.sub(lambda m, e=e: m.group(1) if e <= when(m) else m.group(2), p)] for e in ends])
    return out
