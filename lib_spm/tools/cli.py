"""``python -m lib_spm``: inspect SPM files, run the demo. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys


def inspect_info(path) -> dict:
    """What ``inspect --json`` prints: JSON-ready values only (strings, numbers, lists, dicts)."""
    from ..format.spm_file import load_spm
    from ..operations.lora_check import webui_lora_check

    spm = load_spm(path)
    ok, why = webui_lora_check(spm)
    md = spm.metadata
    return {
        "file": str(spm.path),
        "name": spm.name,
        "format": "original model zoo" if md.format == "zoo" else f"sd-webui-spm v{md.to_dict()['spm_format']}",
        "architecture": spm.arch or "unknown",
        "rank": spm.rank,
        "alpha": sorted(spm.alphas) if len(spm.alphas) > 1 else next(iter(spm.alphas)),
        "targets": md.targets,
        "ungated": spm.ungated,
        "surrogates": md.surrogates,
        "slices": [{"name": s.name, "concepts": list(s.concepts), "rank": s.rank} for s in spm.slices()],
        "layers": len(spm.layers),
        "parameters": spm.parameter_count,
        "dtype": str(next(iter(spm.layers.values())).down.dtype).replace("torch.", ""),
        "sha256": spm.sha256,
        "webui_builtin_lora": {"loads": ok, "detail": why},
        "description": md.description,
        "recipe": md.recipe,
    }


def _inspect(args) -> int:
    info = inspect_info(args.file)
    ok, why = info["webui_builtin_lora"]["loads"], info["webui_builtin_lora"]["detail"]
    if args.json:
        # strict JSON: the loader refused NaN/Infinity and lone surrogates, allow_nan=False proves it
        print(json.dumps(info, indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "webui_builtin_lora":
            v = ("yes" if ok else "no") + f" ({why})"
        elif k == "ungated":
            continue  # shown on the targets line
        elif k == "targets" and info["ungated"]:
            v = "(none — ungated: applies to every prompt)" if not v else json.dumps(v, ensure_ascii=False) + \
                "  (a slice has none — ungated: it applies to every prompt)"
        elif isinstance(v, (list, dict)):
            if not v:
                continue
            v = json.dumps(v, ensure_ascii=False)
        elif v in ("", None):
            continue
        print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    metrics = run_demo(args.out, concept=args.concept)
    print(json.dumps(metrics, indent=2))
    return 0


def _bench(args) -> int:
    from .bench import bench_runtime

    print(json.dumps(bench_runtime(args.arch, latent=args.latent, batch=args.batch, rounds=args.rounds,
                                   counts=tuple(args.counts)), indent=2))
    return 0


def _bench_train_memory(args) -> int:
    from .bench_memory import bench_train_memory

    print(json.dumps(bench_train_memory(args.arch, args.resolution, args.iterations, args.max_denoising_steps,
                                        args.anchors, compare=args.compare), indent=2))
    return 0


def _bench_bake(args) -> int:
    from .bench_bake import bench_bake_memory

    res = bench_bake_memory(args.arch, args.dtype, float_only=args.float_only, code=args.code, workdir=args.workdir,
                            only=args.only)
    print(json.dumps(res, indent=2))
    return 0


def _bench_erasure(args) -> int:
    from ..errors import SPMValueError
    from ..world.bench_erasure import WITH_X2, main

    samplings = ("fresh", "pool") if args.sampling == "both" else (args.sampling,)
    gates = tuple(g.strip() for g in args.gates.split(","))
    unknown = [g for g in gates if g not in WITH_X2]
    if unknown:
        raise SPMValueError(f"unknown gate {unknown[0]!r}: use {', '.join(WITH_X2)}")
    main(args.json, n=args.n, seed=args.seed, others_every=args.others_every, cases=args.cases, samplings=samplings,
         gates=gates)
    return 0


def _bench_robustness(args) -> int:
    from ..world.bench_robustness import main

    main(args.json, n=args.n, quick=args.quick, seed=args.seed, work=args.work, packs=args.packs,
         soft_gates=args.soft_gates, gates=args.gates, budget_spec=args.budget, attacks=args.attacks,
         listed_names=args.listed_names)
    return 0


def _bench_fuzz(args) -> int:
    from .fuzz import bench_fuzz

    report = bench_fuzz(args.n, seed=args.seed)
    print(json.dumps(report, indent=1))
    return 0 if report["bad"] == 0 else 1


def _bench_merge(args) -> int:
    from ..world.bench_merge import main

    main(args.json, n=args.n, seed=args.seed)
    return 0


def _world_train(args) -> int:
    from ..world.train_world import train_world

    train_world(args.out, args.steps, batch=args.batch, lr=args.lr, resume=args.resume, threads=args.threads,
                save_every=args.save_every, seed=args.seed)
    return 0


def _world_classifier(args) -> int:
    from ..world.train_world import train_classifier

    acc = train_classifier(args.out, steps=args.steps)
    return 0 if acc >= 0.99 else 1


def _world_release(args) -> int:
    from ..world.model import WEIGHTS
    from ..world.train_world import release

    print(release(args.source, args.classifier, args.dst or WEIGHTS))
    return 0


def _world_eval(args) -> int:
    from pathlib import Path

    from ..world.model import WEIGHTS, load_world
    from ..world.pipeline import WorldPipeline, accuracy, eval_prompts

    folder = Path(args.weights) if args.weights else WEIGHTS
    pipe = WorldPipeline(load_world(folder))
    res = accuracy(pipe, eval_prompts(), n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
    summary = {
        "shape_accuracy": round(sum(r["shape"] for r in res.values()) / len(res), 4),
        "colour_accuracy": round(sum(r["colour"] for r in res.values()) / len(res), 4),
        "samples_per_prompt": args.n, "seed": args.seed, "sampling_steps": args.steps, "cfg": args.cfg,
    }
    if args.record:
        info = json.loads((folder / "world.json").read_text())
        info["eval"] = {**summary, "per_prompt": {p: {"shape": r["shape"], "colour": r["colour"]} for p, r in res.items()}}
        (folder / "world.json").write_text(json.dumps(info, indent=2))
    out = {**summary, "per_prompt": res} if args.json else {
        **summary, "worst_shape": sorted(((p, r["shape"]) for p, r in res.items()), key=lambda kv: kv[1])[:6]}
    print(json.dumps(out, indent=1))
    return 0


def _weighted(specs: list[str]):
    """``path[:weight]`` per input; a path ending in .safetensors is whole (Windows drive colons)."""
    from ..format.spm_file import load_spm
    from ..values import name_weight

    out = []
    for spec in specs:
        path, w = (spec, None) if spec.endswith(".safetensors") else name_weight(spec)
        out.append((load_spm(path), 1.0 if w is None else w))
    return out


def _merge(args) -> int:
    from ..operations.merge import merge_compressed, merge_exact

    inputs = _weighted(args.inputs)
    name = args.name or __import__("pathlib").Path(args.out).stem
    if args.rank is None and args.error_budget is None:
        pack, report = merge_exact(inputs, name=name), None
    else:
        pack, report = merge_compressed(inputs, rank=args.rank, error_budget=args.error_budget, name=name)
    pack.save(args.out, dtype=_dtype(args.dtype))
    info = {"file": args.out, "rank": pack.rank, "slices": [s.name for s in pack.slices()],
            "bytes": __import__("os").path.getsize(args.out)}
    if report:
        info.update(overall_relative_error=round(report.overall_error, 6),
                    worst_layer_error=round(max(report.per_layer_error.values()), 6))
        if report.note:
            print(f"note: {report.note}", file=sys.stderr)
    print(json.dumps(info, indent=2))
    return 0


def _extract(args) -> int:
    from ..format.spm_file import load_spm
    from ..operations.merge import extract

    extract(load_spm(args.pack), args.slice).save(args.out)
    print(args.out)
    return 0


def _bake(args) -> int:
    from ..operations.merge import bake_diffusers_folder, bake_ldm_checkpoint

    inputs = _weighted(args.inputs)
    if __import__("pathlib").Path(args.src).is_dir():
        rep = bake_diffusers_folder(args.src, args.dst, inputs)
    else:
        rep = bake_ldm_checkpoint(args.src, args.dst, inputs, arch=args.arch)
    print(json.dumps(rep, indent=2))
    return 0


def _ui(args) -> int:
    import os
    from pathlib import Path

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        print("error: gradio is not installed in this Python; `make ui-env` builds .venv-ui, then run "
              ".venv-ui/bin/python -m lib_spm ui ...", file=sys.stderr)
        return 2

    from ..ui import gradio_compat
    from ..ui.local import LocalHost
    from ..ui.tab import build_tab

    Path(args.spm_dir).mkdir(parents=True, exist_ok=True)
    host = LocalHost(args.spm_dir, checkpoint_dir=args.checkpoint_dir)
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the server works offline
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    demo = build_tab(host, title="SPM (shapes world)", theme=theme)
    demo.queue(**gradio_compat.queue_kwargs(4)).launch(server_name=args.host, server_port=args.port, show_api=False)
    return 0


def _train(args) -> int:
    from .train import train_world_spm

    print(json.dumps(train_world_spm(args.out, args.target, args.surrogate, sampling=args.sampling,
                                     iterations=args.iterations, anchors=args.anchors, seed=args.seed,
                                     checkpoint_every=args.checkpoint_every, resume=args.resume), indent=2))
    return 0


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_spm", description="Concept Semi-Permeable Membranes (SPM)")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="show what an SPM file holds and whether the WebUI's Lora can load it")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(run=_inspect)
    d = sub.add_parser("demo", help="apply an SPM to a small model and report what Facilitated Transport did")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--concept", default="circle")
    d.set_defaults(run=_demo)
    b = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True)
    r = bsub.add_parser("runtime", help="UNet call time with 0/1/4/16 gated SPMs attached, full-size")
    r.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default="sd1")
    r.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px for SD1)")
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16], help="numbers of SPMs to time")
    r.set_defaults(run=_bench)
    bb = bsub.add_parser("bake-memory", help="peak RSS of baking into a full-size random checkpoint vs its size")
    bb.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    bb.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16", help="the checkpoint's float dtype")
    bb.add_argument("--float-only", action="store_true", help="leave out int64/int32/bool tensors (older code refused them)")
    bb.add_argument("--code", default=None, help="bake with the lib_spm in this folder (an older checkout)")
    bb.add_argument("--workdir", default=None, help="where the checkpoint is written (default: the temp folder)")
    bb.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="keep only float tensors whose names contain TEXT (repeatable): a smaller checkpoint")
    bb.set_defaults(run=_bench_bake)
    tm = bsub.add_parser("train-memory", help="peak memory of a few training iterations on a full-size random UNet")
    tm.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default="sd1")
    tm.add_argument("--resolution", type=int, default=None, help="pixels (default: 512 for sd1/sd2, 1024 for sdxl)")
    tm.add_argument("--iterations", type=int, default=2)
    tm.add_argument("--max-denoising-steps", type=int, default=30,
                    help="the trainer's setting; fewer is faster and does not change the peak")
    tm.add_argument("--anchors", type=int, default=4)
    tm.add_argument("--compare", action="store_true",
                    help="also run without the memory savers (checkpointing, autocast) and give the ratios")
    tm.set_defaults(run=_bench_train_memory)
    e = bsub.add_parser("erasure", help="erasure quality in the shapes world (cases, gates, training cost)")
    e.add_argument("--n", type=int, default=16, help="samples per prompt")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="also write the full report here")
    e.add_argument("--others-every", type=int, default=1, help="keep every k-th non-target prompt (cheaper)")
    e.add_argument("--cases", choices=("all", "one"), default="all",
                   help="one: only the one-concept case (circle), trained once per --sampling")
    e.add_argument("--sampling", choices=("fresh", "pool", "both"), default="both",
                   help="with --cases one: the training sampling(s) to compare")
    e.add_argument("--gates", default="calibrated", help="with --cases one: comma-separated of off,published,calibrated")
    e.set_defaults(run=_bench_erasure)
    rb = bsub.add_parser("robustness", help="attacks on erasure (names, hiding, token search, soft token) and "
                                            "packs of 1-5 SPMs in the shapes world, per gate")
    rb.add_argument("--n", type=int, default=None, help="samples per prompt (default 16; 4 with --quick)")
    rb.add_argument("--quick", action="store_true", help="small search and soft-token budgets (a check that it runs)")
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--json", default=None, help="also write the full report here")
    rb.add_argument("--work", default="world_runs/robustness", help="trained SPMs are cached here, keyed by recipe")
    rb.add_argument("--packs", type=int, nargs="*", default=[1, 2, 3, 5], choices=[1, 2, 3, 5])
    gate_names = ["off", "published", "calibrated", "moderation", "moderation x2", "moderation no contrast"]
    rb.add_argument("--gates", nargs="+", default=None, choices=gate_names,
                    help="gate settings to attack (default: the first four; 'moderation x2' is a lever to compare)")
    rb.add_argument("--soft-gates", nargs="+", default=None, choices=gate_names,
                    help="gates the soft token is trained against (default: every gate attacked)")
    rb.add_argument("--budget", default=None, metavar="NAME=VALUE,...",
                    help="override budget fields (n, steps, search_slots, search_samples, search_steps, soft_steps, ...)")
    rb.add_argument("--attacks", nargs="*", default=["naming", "hiding", "search", "soft"],
                    choices=["naming", "hiding", "search", "soft"], help="attack families to run (none: packs only)")
    rb.add_argument("--listed-names", action="store_true",
                    help="gate each SPM by its concept and the world's synonyms of it, as an operator lists them")
    rb.set_defaults(run=_bench_robustness)
    bm = bsub.add_parser("merge", help="a three-concept pack in the shapes world: side by side, exact, compressed, baked")
    bm.add_argument("--n", type=int, default=16, help="samples per prompt")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--json", default=None)
    bm.set_defaults(run=_bench_merge)
    fz = bsub.add_parser("fuzz", help="load seeded mutants of valid SPM files; count outcomes (BENCHMARKS.md)")
    fz.add_argument("--n", type=int, default=10_000, help="number of mutants")
    fz.add_argument("--seed", type=int, default=0)
    fz.set_defaults(run=_bench_fuzz)
    m = sub.add_parser("merge", help="merge SPMs into one pack: exact (each keeps its gate) or compressed (SVD)")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+", help="FILE or FILE:WEIGHT")
    m.add_argument("--rank", type=int, default=None, help="compress to this rank")
    m.add_argument("--error-budget", type=float, default=None, help="compress to the smallest rank within this relative error")
    m.add_argument("--name", default=None)
    m.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    m.set_defaults(run=_merge)
    x = sub.add_parser("extract", help="pull one slice out of an exact pack")
    x.add_argument("pack")
    x.add_argument("slice")
    x.add_argument("out")
    x.set_defaults(run=_extract)
    k = sub.add_parser("bake", help="write a new checkpoint with SPM deltas added (loses Facilitated Transport)")
    k.add_argument("src", help="single-file .safetensors LDM checkpoint or diffusers folder")
    k.add_argument("dst")
    k.add_argument("inputs", nargs="+", help="FILE or FILE:WEIGHT")
    k.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default=None)
    k.set_defaults(run=_bake)
    t = sub.add_parser("train", help="train an SPM on the shipped shapes world (steps and ETA on stderr)")
    t.add_argument("out", help="the SPM file to write (.safetensors); its checkpoint goes next to it")
    t.add_argument("--target", action="append", required=True, help="a concept to erase (repeat for more)")
    t.add_argument("--surrogate", action="append", default=[],
                   help="what it becomes: once for all targets or once per target (default \"\")")
    t.add_argument("--sampling", choices=("fresh", "pool"), default="fresh",
                   help="fresh: new noise every step (default). pool: shared trajectories, about 3x fewer UNet "
                        "passes, but weaker with the gate off or baked (BENCHMARKS.md)")
    t.add_argument("--iterations", type=int, default=None, help="default: the shapes world preset's 250")
    t.add_argument("--anchors", type=int, default=None, help="default: 4 for fresh, 3 for pool (as benchmarked)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint next to OUT")
    t.set_defaults(run=_train)
    u = sub.add_parser("ui", help="serve the SPM tab (train, manage, merge) standalone on the shapes world")
    u.add_argument("--spm-dir", required=True, help="the SPM folder")
    u.add_argument("--checkpoint-dir", default=None, help="checkpoints to bake into (default: SPM folder/checkpoints)")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--host", default="127.0.0.1")
    u.set_defaults(run=_ui)
    w = sub.add_parser("world", help="train the shapes world (the shipped weights came from these commands)")
    wsub = w.add_subparsers(dest="world", required=True)
    wt = wsub.add_parser("train", help="train the text-to-image world model from scratch (or --resume)")
    wt.add_argument("--out", required=True)
    wt.add_argument("--steps", type=int, default=12000)
    wt.add_argument("--batch", type=int, default=64)
    wt.add_argument("--lr", type=float, default=6e-4)
    wt.add_argument("--seed", type=int, default=0)
    wt.add_argument("--save-every", type=int, default=250)
    wt.add_argument("--threads", type=int, default=None)
    wt.add_argument("--resume", action="store_true")
    wt.set_defaults(run=_world_train)
    wc = wsub.add_parser("classifier", help="train the judge on clean renders (fails below 99% accuracy)")
    wc.add_argument("--out", required=True)
    wc.add_argument("--steps", type=int, default=3000)
    wc.set_defaults(run=_world_classifier)
    wr = wsub.add_parser("release", help="copy a run's EMA weights (fp16) and a classifier into the shipped folder")
    wr.add_argument("--from", dest="source", required=True, help="the run's ema folder")
    wr.add_argument("--classifier", required=True)
    wr.add_argument("--dst", default=None)
    wr.set_defaults(run=_world_release)
    we = wsub.add_parser("eval", help="judge a world: shape and colour accuracy per prompt")
    we.add_argument("--weights", default=None, help="folder with unet/text_encoder/classifier (default: shipped)")
    we.add_argument("--n", type=int, default=16)
    we.add_argument("--seed", type=int, default=0)
    we.add_argument("--steps", type=int, default=20)
    we.add_argument("--cfg", type=float, default=4.0)
    we.add_argument("--json", action="store_true")
    we.add_argument("--record", action="store_true", help="store the result in the folder's world.json")
    we.set_defaults(run=_world_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import SPMError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SPMError, OSError, ValueError) as e:
        print("error: " + _one_line(str(e)), file=sys.stderr)
        return 2
    except (RecursionError, MemoryError, TypeError, KeyError, IndexError, ArithmeticError) as e:
        # a bug, not a bad file (those are SPMErrors): still one line, with its type to report
        print(f"error: unexpected {type(e).__name__}: " + _one_line(str(e)), file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    return " ".join(message.split())[:2000].encode("utf-8", "backslashreplace").decode("utf-8")
