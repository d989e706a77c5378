"""Stable Diffusion's CLIP tokenizer, built offline from the BPE file open-clip-torch ships.

No hub download: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` holds CLIP's merges; the vocabulary
is derived from them exactly as CLIP's own ``SimpleTokenizer`` does. ``open_clip`` itself is
never imported (it drags in torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path


def bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]  # CLIP's order: printable bytes first, as the dict was built


@lru_cache(maxsize=1)
def clip_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` giving SD's ids ("a red circle" -> 49406 320 736 7117 49407)."""
    from transformers import CLIPTokenizer

    merges = gzip.open(bpe_path()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    base = _bytes_to_unicode()
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="spm-clip-vocab-"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                         pad_token="<|endoftext|>")
