"""Fuzzing the loader: seeded mutants of valid SPM files, and what loading each one gives.

``python -m lib_spm bench fuzz --n 10000`` runs the full corpus; ``tests/test_fuzz_files.py`` runs a
few thousand of the same mutants. A file must load (and then be a usable SPM) or raise an
:class:`~lib_spm.errors.SPMError`; anything else is a bug. Mutants are generated from the seed
(nothing is stored), so a failure is reproduced by its index.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import socket
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save as st_save

from ..errors import SPMError
from ..format.metadata import Slice, SPMMetadata
from ..format.safetensors_io import serialize

# -- seeds: small valid files in every dialect, dtype and metadata flavour ------------------------

_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1: 768 -> 320
_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 320 -> 320
_P = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1: 1x1 conv 320 -> 320


def _pair(g, out: int, ins: int, rank: int, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    extra = (1, 1) if conv else ()
    return (torch.randn(rank, ins, *extra, generator=g) * 0.02, torch.randn(out, rank, *extra, generator=g) * 0.02)


def builtin_seeds() -> list[tuple[str, bytes]]:
    """Four small files: original zoo keys (F32), our pack format (F16), peft (BF16), kohya (F64)."""
    g = torch.Generator().manual_seed(0)
    seeds = []
    t = {}
    for stem, (out, ins, conv) in {_K: (320, 768, False), _P: (320, 320, True)}.items():
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = _pair(g, out, ins, 1, conv)
        t[f"{stem}.alpha"] = torch.tensor(1.0)
    seeds.append(("zoo_f32", st_save(t, metadata={"prompts": "cat,dog", "rank": "1", "alpha": "1.0"})))
    t = {}
    for stem, (out, ins) in {_K: (320, 768), _Q: (320, 320)}.items():
        down, up = _pair(g, out, ins, 3)
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down.half(), up.half()
        t[f"{stem}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    md = SPMMetadata(targets=["cat", "dog"], surrogates={"cat": "", "dog": "animal"}, arch="sd1", rank=3,
                     alpha=2.0, name="pack", description="two slices", recipe={"lr": 1e-4, "steps": [1, 2]},
                     slices=[Slice("cats", ("cat",), 2), Slice("dogs", ("dog", "puppy"), 1)])
    seeds.append(("pack_f16", serialize(t, md.to_dict())))
    t = {}
    down, up = _pair(g, 320, 768, 2)
    t[f"{_K}.lora_A.weight"], t[f"{_K}.lora_B.weight"] = down.bfloat16(), up.bfloat16()
    seeds.append(("peft_bf16", st_save(t)))
    t = {}
    for stem, (out, ins) in {_K: (320, 768), _Q: (320, 320)}.items():
        down, up = _pair(g, out, ins, 1)
        t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down.double(), up.double()
        t[f"{stem}.alpha"] = torch.tensor(1.0, dtype=torch.float64)
    kohya = {"ss_network_dim": "1", "ss_network_alpha": "1", "ss_base_model_version": "sd_v1",
             "spm_format": "1", "spm_targets": json.dumps(["cat"])}
    seeds.append(("kohya_f64", st_save(t, metadata=kohya)))
    return seeds


# -- taking a file apart and putting it back together ---------------------------------------------

def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def canonical(blob: bytes) -> bytes:
    """The same file with its metadata keys sorted: the safetensors writer orders them by a random
    hash, and mutants must be reproducible across runs."""
    header, data = _split(blob)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    return _join(json.dumps(header, separators=(",", ":")), data)


def _with_fragment(header: dict, path: tuple, fragment: str) -> str:
    """The header as JSON text with the value at ``path`` replaced by a raw JSON ``fragment``."""
    marker = "\x00FRAGMENT\x00"
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = marker
    return json.dumps(header).replace(json.dumps(marker), fragment)


def _bomb(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


# Raw JSON for any field: every JSON type, hostile numbers and strings, nesting bombs.
FRAGMENTS = (
    "null", "true", "false", "0", "-1", "1", "1.5", "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
    str(2 ** 64), str(2 ** 63 - 1), str(10 ** 30), "9" * 4300, '""', '"x"', '"F32"', '"I64"', '"F8_E4M3"',
    '"\\ud800"', '"\\udfff x"', "[]", "[1]", '["F32"]', "[-1, 5]", "[1.5, 2]", "[true, 1]", "[1e400]",
    "[0, 0]", f"[{2 ** 64}, {2 ** 64 + 4}]", "{}", '{"a": 1}', _bomb(1000), _bomb(100), _bomb(50000),
    '{"a":' * 900 + "1" + "}" * 900, '"' + "a" * 70000 + '"',
)

# Metadata values (strings holding whatever): numbers, JSON of every type, bombs, surrogates.
META_VALUES = (
    "", "0", "-1", "1", "2", "1.9", "1e400", "inf", "-inf", "nan", "NaN", "true", "1_0", "\u0661",
    " 1 ", "9" * 4300, "1e-400", "3", "0x10", "99", "sd3", "sdxl", "sd1", "v1",
    "[]", "{}", '"cat"', "cat", "[1]", '["cat"]', '["cat", "cat"]', '["\\ud800"]', "[NaN]", '{"lr": NaN}',
    '{"lr": Infinity}', '{"x": 1e400}', _bomb(1000), _bomb(30), '{"a":' * 1000 + "1" + "}" * 1000,
    '[{"name": "a", "concepts": "cat", "rank": 1}]', '[{"name": "a", "concepts": ["cat"], "rank": 1.9}]',
    '[{"name": "a", "concepts": ["cat"], "rank": true}]', '[{"name": "a", "concepts": ["cat"], "rank": 1e400}]',
    '[{"name": "a", "concepts": ["cat"], "rank": 2}, {"name": "a", "concepts": ["dog"], "rank": 1}]',
    '[{"name": "a", "concepts": ["cat"], "rank": 3}]', '[{"name": "a", "concepts": [], "rank": 1}]',
    '[{"name": "a", "concepts": ["cat"]}]', '[{"name": 5, "concepts": ["cat"], "rank": 1}]',
    '{"cat": 5}', '{"cat": ["x"]}', "x" * 100000,
)
META_KEYS = ("prompts", "rank", "alpha", "spm_format", "spm_targets", "spm_surrogates", "spm_arch",
             "spm_recipe", "spm_slices", "spm_name", "spm_description", "ss_network_dim", "ss_network_alpha",
             "ss_base_model_version", "ss_v2")

# Values that are finite in their dtype and break in use, or are not finite at all.
POKES = (65504.0, -65504.0, 6e4, 1e5, 3e38, 1e200, 0.0, float("nan"), float("inf"), -float("inf"), 1e-30)

KEY_NAMES = (
    "model.diffusion_model.input_blocks.1.1.proj_in.weight", "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "lora_unet_x", "", "\u00e9", "lora_unet_a.lora_mid.weight", "diffusion_model_a", "__metadata__",
)


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def m_flip(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    end = 8 + n if rng.random() < 0.6 else len(b)  # mostly inside the header, where parsing happens
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return bytes(b)


def m_truncate(rng: random.Random, blob: bytes) -> bytes:
    return blob[:rng.randrange(len(blob))]


def m_append(rng: random.Random, blob: bytes) -> bytes:
    return blob + bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64, 4096))))


def m_header_len(rng: random.Random, blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    new = rng.choice((0, 1, n - 1, n + 1, n + 8, 2 ** 24, 2 ** 63, 2 ** 64 - 1, n * 2))
    return struct.pack("<Q", max(0, min(new, 2 ** 64 - 1))) + blob[8:]


def m_field(rng: random.Random, blob: bytes) -> bytes:
    """One field of one tensor entry (dtype, shape, offsets, a dimension, an offset) replaced."""
    header, data = _split(blob)
    key = rng.choice(_tensor_keys(header))
    path = rng.choice(((key, "dtype"), (key, "shape"), (key, "data_offsets"), (key,), (key, "extra"),
                       (key, "shape", 0), (key, "data_offsets", 1), (key, "data_offsets", 0)))
    if len(path) == 3 and not header[key][path[1]]:
        path = path[:2]
    return _join(_with_fragment(header, path, rng.choice(FRAGMENTS)), data)


def m_top(rng: random.Random, blob: bytes) -> bytes:
    """The whole header, or __metadata__, replaced by a fragment."""
    header, data = _split(blob)
    if rng.random() < 0.5:
        return _join(rng.choice(FRAGMENTS), data)
    return _join(_with_fragment(header, ("__metadata__",), rng.choice(FRAGMENTS)), data)


def m_metadata(rng: random.Random, blob: bytes) -> bytes:
    header, data = _split(blob)
    md = header.setdefault("__metadata__", {})
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(META_KEYS)
        if key in md and rng.random() < 0.15:
            del md[key]
        else:
            md[key] = rng.choice(META_VALUES)
    text = json.dumps(header)
    if rng.random() < 0.1:  # a lone surrogate or a duplicate key, which json.dumps cannot write
        text = text.replace('"__metadata__": {', rng.choice(('"__metadata__": {"x": "\\ud83d", ',
                                                             '"__metadata__": {"rank": "1", "rank": "2", ')), 1)
    return _join(text, data)


def m_layout(rng: random.Random, blob: bytes) -> bytes:
    """Offsets swapped, shifted or made to overlap; shapes permuted or resized; dtypes swapped."""
    header, data = _split(blob)
    keys = _tensor_keys(header)
    a, b = rng.choice(keys), rng.choice(keys)
    ea, eb = header[a], header[b]
    op = rng.randrange(6)
    if op == 0:
        ea["data_offsets"], eb["data_offsets"] = eb["data_offsets"], ea["data_offsets"]
    elif op == 1:
        d = rng.choice((-8, -2, -1, 1, 2, 8))
        ea["data_offsets"] = [ea["data_offsets"][0] + d, ea["data_offsets"][1] + d]
    elif op == 2:
        ea["data_offsets"] = list(eb["data_offsets"])
    elif op == 3:
        ea["shape"] = list(reversed(ea["shape"]))
    elif op == 4:
        ea["dtype"] = rng.choice(("F16", "BF16", "F32", "F64", "I64", "U8", "BOOL"))
    else:
        ea["shape"] = [d * rng.choice((0, 2)) for d in ea["shape"]] or [0]
    return _join(json.dumps(header), data)


def _retensor(blob: bytes, edit: Callable[[dict], None]) -> bytes:
    """Rewrite through torch: a well-formed file whose tensors say something else."""
    from safetensors.torch import load

    header, _ = _split(blob)
    tensors = {k: v.clone() for k, v in load(blob).items()}
    edit(tensors)
    return serialize(tensors, header.get("__metadata__") or {})  # deterministic, unlike st_save


def m_values(rng: random.Random, blob: bytes) -> bytes:
    def edit(t):
        key = rng.choice(sorted(t))
        flat = t[key].reshape(-1)
        value = torch.tensor(rng.choice(POKES), dtype=torch.float64).to(flat.dtype)  # 1e200 in F16: inf
        if rng.random() < 0.3:
            flat.fill_(value)
        else:
            flat[rng.randrange(flat.numel())] = value
    return _retensor(blob, edit)


def m_tensors(rng: random.Random, blob: bytes) -> bytes:
    """Keys renamed, dropped or added; shapes that do not pair; zero-size and scalar tensors."""
    def edit(t):
        key = rng.choice(sorted(t))
        op = rng.randrange(6)
        if op == 0:
            t[rng.choice(KEY_NAMES) + rng.choice(("", ".lora_down.weight", ".alpha"))] = t.pop(key)
        elif op == 1:
            del t[key]
        elif op == 2:
            t[key] = torch.zeros(*[0 if i == rng.randrange(max(1, t[key].dim())) else d
                                   for i, d in enumerate(t[key].shape)] or [0], dtype=t[key].dtype)
        elif op == 3:
            t[key] = t[key].reshape(-1)[: max(1, t[key].numel() // 2)].clone()
        elif op == 4:
            t[key.rsplit(".", 2)[0].replace("lora_", "lora_", 1) + "_copy.lora_down.weight"] = t[key].clone()
        else:
            t[key] = torch.zeros(rng.choice(((1, 10240 * 4), (2, 16, 3, 3), (1,), (1, 1, 1, 1, 1))),
                                 dtype=t[key].dtype)
    return _retensor(blob, edit)


MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "byte_flip": m_flip, "truncate": m_truncate, "trailing_bytes": m_append, "header_length": m_header_len,
    "header_field": m_field, "header_top": m_top, "metadata": m_metadata, "layout": m_layout,
    "values": m_values, "tensors": m_tensors,
}


@dataclass(frozen=True)
class Mutant:
    index: int
    seed_name: str
    mutator: str
    data: bytes


def mutants(seeds: list[tuple[str, bytes]], n: int, seed: int = 0, only: str | None = None) -> Iterator[Mutant]:
    """``n`` mutants, reproducible from ``seed``: mutant i depends only on (seed, i[, only])."""
    names = sorted(MUTATORS)
    seeds = [(name, canonical(blob)) for name, blob in seeds]
    for i in range(n):
        rng = random.Random(f"{seed}:{only or ''}:{i}")
        seed_name, blob = seeds[rng.randrange(len(seeds))]
        mutator = only or names[i % len(names)]
        data = MUTATORS[mutator](rng, blob)
        if rng.random() < 0.2:  # a second mutation on top, where bugs hide between two checks
            try:
                data = MUTATORS[rng.choice(names)](rng, data)
            except Exception:  # noqa: BLE001 - the first mutant was past parsing; keep it
                pass
        yield Mutant(i, seed_name, mutator, data)


# -- special and oversized files -------------------------------------------------------------------

def special_files(folder: Path) -> dict[str, Path]:
    """Paths named *.safetensors that are no regular file; none may be opened for reading."""
    out = {}
    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    (folder / "dir.safetensors").mkdir()
    out["directory"] = folder / "dir.safetensors"
    sock_path = folder / "sock.safetensors"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
        out["socket"] = sock_path
    finally:
        sock.close()  # the socket file stays
    for name, target in (("dev_zero", "/dev/zero"), ("dev_null", "/dev/null"), ("dangling", folder / "nowhere")):
        link = folder / f"{name}.safetensors"
        link.symlink_to(target)
        out[name] = link
    loop = folder / "loop.safetensors"
    loop.symlink_to(loop)
    out["symlink_loop"] = loop
    return out


BIG = 1_100_000_000  # the size of the checkpoints and paddings in the issue: sparse, costs no disk


def big_files(folder: Path, seed_blob: bytes) -> dict[str, Path]:
    """Sparse gigabyte files: an SPM followed by zeros, a checkpoint, an SPM holding one huge tensor."""
    out = {}
    trailing = folder / "trailing_zeros.safetensors"
    trailing.write_bytes(seed_blob)
    os.truncate(trailing, len(seed_blob) + BIG)
    out["trailing_zeros"] = trailing
    rank = BIG // 4 // 768  # a down weight of 1.1 GB in F32 for SD1's 768-wide cross-attention key
    for name, entries in (
        ("checkpoint", {"model.diffusion_model.input_blocks.0.0.weight": ("F32", [BIG // 4])}),
        ("huge_tensor", {f"{_K}.lora_down.weight": ("F32", [rank, 768]), f"{_K}.lora_up.weight": ("F32", [320, rank])}),
    ):
        header, offset = {"__metadata__": {"prompts": "cat"}}, 0
        for key, (dtype, shape) in entries.items():
            size = math.prod(shape) * 4
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        path = folder / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)
        out[name] = path
    return out


# -- judging one file -----------------------------------------------------------------------------

def outcome(path: Path, inspect: bool = True) -> str:
    """"valid", the SPMError subclass's name, or "untyped:<exception>" (a bug).

    ``inspect=False`` skips the costly part of ``inspect``'s check (the WebUI-compatibility walk of
    a full-size reference UNet) for speed; the JSON it prints is still checked."""
    from ..format.spm_file import load_spm
    from .cli import inspect_info

    try:
        spm = load_spm(path)
    except SPMError as e:
        if "\n" in str(e) or not str(e):
            return f"untyped:multi-line {type(e).__name__}"
        return type(e).__name__
    except Exception as e:  # noqa: BLE001 - the point is to count these
        return f"untyped:{type(e).__name__}"
    problem = check_valid(spm, path, inspect_info if inspect else None)
    return f"untyped:{problem}" if problem else "valid"


def check_valid(spm, path: Path, inspect_info=None) -> str | None:
    """A file that loaded must be usable: its hash is its bytes', values fit, inspect gives strict JSON."""
    import hashlib

    from ..format.spm_file import FP16_MAX

    if spm.sha256 != hashlib.sha256(path.read_bytes()).hexdigest():
        return "sha256 is not the file's"
    for w in spm.layers.values():
        if not (torch.isfinite(w.down).all() and torch.isfinite(w.up).all() and math.isfinite(w.scale)):
            return "non-finite weights accepted"
        if w.down.numel() == 0 or w.up.numel() == 0:
            return "zero-size layer accepted"
        if float(w.delta().abs().max()) * 10 > FP16_MAX:
            return "delta overflows fp16 at strength 10"
    if spm.metadata.slices is not None and len({s.name for s in spm.metadata.slices}) != len(spm.metadata.slices):
        return "duplicate slice names accepted"
    md = spm.metadata
    info = inspect_info(path) if inspect_info else {
        "targets": md.targets, "surrogates": md.surrogates, "recipe": md.recipe, "name": spm.name,
        "description": md.description, "alpha": sorted(spm.alphas), "format": md.to_dict()["spm_format"],
        "slices": [[s.name, list(s.concepts), s.rank] for s in spm.slices()], "ungated": spm.ungated}
    try:
        json.dumps(info, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except Exception as e:  # noqa: BLE001
        return f"inspect failed ({type(e).__name__})"
    return None


# -- the benchmark: python -m lib_spm bench fuzz ----------------------------------------------------

class _Hang(BaseException):  # not an Exception: outcome() must not count it as the loader's
    pass


def _alarm(signum, frame):
    raise _Hang()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def bench_fuzz(n: int = 10_000, seed: int = 0, hang_s: float = 15.0, memory_mb: int = 256) -> dict:
    """Load ``n`` mutants plus every special and gigabyte file; count outcomes per class.

    A load that takes over ``hang_s`` seconds counts as a hang (SIGALRM interrupts it); one that
    raises the process's peak RSS by over ``memory_mb`` as a memory blow-up (every seed is < 1 MB).
    """
    seeds = builtin_seeds()
    counts: Counter = Counter()
    by_mutator: dict[str, Counter] = {}
    failures = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            named = [(f"special:{k}", p) for k, p in special_files(folder).items()]
            named += [(f"big:{k}", p) for k, p in big_files(folder, seeds[0][1]).items()]
            path = folder / "mutant.safetensors"
            for name, p in named:
                result = _judge(p, hang_s, memory_mb)
                counts[result] += 1
                by_mutator.setdefault(name.split(":")[0], Counter())[result] += 1
                if _bad(result):
                    failures.append((name, result))
            for m in mutants(seeds, n, seed):
                path.write_bytes(m.data)
                result = _judge(path, hang_s, memory_mb)
                counts[result] += 1
                by_mutator.setdefault(m.mutator, Counter())[result] += 1
                if _bad(result):
                    failures.append((m.index, result))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return {
        "mutants": n, "seed": seed, "special_and_big_files": sum(by_mutator.get(k, Counter()).total()
                                                                 for k in ("special", "big")),
        "outcomes": dict(counts.most_common()),
        "by_mutator": {k: dict(v.most_common()) for k, v in sorted(by_mutator.items())},
        "bad": len(failures), "first_bad": failures[:20],
    }


def _bad(result: str) -> bool:
    return result.startswith("untyped:") or result in ("hang", "memory_blowup")


def _judge(path: Path, hang_s: float, memory_mb: int) -> str:
    before = _maxrss()
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        result = outcome(path)
    except _Hang:
        return "hang"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if _maxrss() - before > memory_mb * 2 ** 20:
        return "memory_blowup"
    return result
