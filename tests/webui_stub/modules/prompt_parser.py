"""AND with ``:weight`` and ``[a:b:N]`` prompt editing: what these tests use of the WebUI's parser.

Written anew (no lark) after v1.10.1's ``modules/prompt_parser.py``: N written with a decimal
point is a fraction of the steps (``0.25``, ``.5``; ``1.5`` in a hires pass, which counts
fractions from 1.0), otherwise a step (counted from the first pass's steps in a hires pass);
``use_old_scheduling`` reads N < 1 as a fraction, N >= 1 as a step, and ignores the hires pass.
Not modelled: nested edits, ``[a:N]``/``[a::N]``, alternation ``[a|b]``.
"""
import re

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"  # lark's SIGNED_NUMBER
EDIT = re.compile(rf"\[([^\[\]:]*):([^\[\]:]*):\s*({NUMBER})\s*\]")


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
    steps, int_offset, flt_offset = (hires_steps, base_steps, 1.0) if hires else (base_steps, 0, 0.0)

    def when(m):
        text = m.group(3)
        v = float(text)
        if use_old_scheduling:
            v = v * steps if v < 1 else v
        elif "." in text:
            v = (v - flt_offset) * steps
        else:
            v = v - int_offset
        return min(steps, int(v))

    out = []
    for p in prompts:
        ends = sorted({steps} | {when(m) for m in EDIT.finditer(p) if when(m) >= 1})
        out.append([[e, EDIT.sub(lambda m, e=e: m.group(1) if e <= when(m) else m.group(2), p)] for e in ends])
    return out
