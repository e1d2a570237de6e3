"""Survey compressdrop (attach -> prune -> mask parity -> export_onnx) on one model of each
torchvision classification family. Parent runs each model in a child process (one at a time)
with a timeout and an RLIMIT_AS cap; the child writes its results stage by stage to a JSON file
so that partial results survive a crash/timeout.

Needs torchvision: in a venv of its own, pip install torch==2.14.1 torchvision==0.29.1, then
pip install -e . (see BENCHMARKS.md, section 7).

usage: python benchmarks/bench_torchvision.py [--only name,name] [--timeout 300] [--mem-gb 8]
       python bench_torchvision.py --child NAME --json PATH --mem-gb 8   (internal)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import traceback

# per-model logs, JSON and ONNX files go to a scratch folder; the summary to benchmarks/results
HERE = os.environ.get("BENCH_TV_WORK", "/tmp/compressdrop_bench_torchvision")
ONNX_DIR = os.path.join(HERE, "onnx")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "torchvision.json")

# name -> (family, builder source, input HxW, big?)
MODELS = [
    ("alexnet", "alexnet", 64, False),
    ("vgg", "vgg11_bn", 64, False),
    ("resnet", "resnet18", 64, False),
    ("resnext", "resnext50_32x4d", 64, False),
    ("wide_resnet", "wide_resnet50_2", 64, False),
    ("densenet", "densenet121", 64, False),
    ("squeezenet", "squeezenet1_1", 64, False),
    ("inception", "inception_v3", 80, False),
    ("googlenet", "googlenet", 64, False),
    ("mobilenet_v2", "mobilenet_v2", 64, False),
    ("mobilenet_v3", "mobilenet_v3_small", 64, False),
    ("mnasnet", "mnasnet0_5", 64, False),
    ("shufflenet_v2", "shufflenet_v2_x0_5", 64, False),
    ("efficientnet", "efficientnet_b0", 64, False),
    ("efficientnet_v2", "efficientnet_v2_s", 64, False),
    ("regnet_x", "regnet_x_400mf", 64, False),
    ("regnet_y", "regnet_y_400mf", 64, False),
    ("convnext", "convnext_tiny", 64, False),
    ("vit", "vit_b_16", 224, True),
    ("swin", "swin_t", 224, True),
    ("swin_v2", "swin_v2_t", 224, True),
    ("maxvit", "maxvit_t", 224, True),
]
BY_NAME = {m[1]: m for m in MODELS}


def build(name: str, size: int):
    import torchvision.models as tvm

    kw = dict(weights=None, num_classes=10)
    if name in ("inception_v3", "googlenet"):
        kw.update(aux_logits=False, init_weights=False)
    if name == "vit_b_16" and size != 224:
        kw.update(image_size=size)
    if name == "maxvit_t" and size != 224:
        kw.update(input_size=(size, size))
    return getattr(tvm, name)(**kw)


def n_params(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def short_exc(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:400]


def frames(e: BaseException) -> dict:
    """Innermost frame overall and innermost frame inside compressdrop, following __cause__."""
    out = {}
    chain = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    info = []
    for ex in chain:
        tb = traceback.extract_tb(ex.__traceback__)
        cd = [f for f in tb if "/compressdrop/" in f.filename]
        d = {"exc": short_exc(ex)}
        if tb:
            f = tb[-1]
            d["innermost"] = f"{f.filename}:{f.lineno}:{f.name}: {f.line}"
        if cd:
            f = cd[-1]
            rel = f.filename.split("/work/main/")[-1]
            d["compressdrop_frame"] = f"{rel}:{f.lineno}:{f.name}: {f.line}"
        info.append(d)
    out["chain"] = info
    out["traceback"] = "".join(traceback.format_exception(e))[-6000:]
    return out


def shorten_reason(msg: str) -> str:
    msg = re.sub(r"^compressdrop:\s*", "", msg)
    msg = re.sub(r"'[^']*'", "'…'", msg)
    msg = re.sub(r"\([^()]*\d[^()]*\)", "(…)", msg)
    return msg[:220]


class Recorder:
    def __init__(self, path: str, base: dict):
        self.path = path
        self.data = base
        self.flush()

    def set(self, **kw):
        self.data.update(kw)
        self.flush()

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def make_nondegenerate(model) -> list[str]:
    """Re-init parts whose default init hides pruning from the output (for a supplementary run)."""
    import torch

    done = []
    for n, m in model.named_modules():
        if type(m).__name__ == "CNBlock" and hasattr(m, "layer_scale"):
            with torch.no_grad():
                m.layer_scale.fill_(1.0)
            done.append(f"{n}.layer_scale=1")
    heads = getattr(model, "heads", None)
    if heads is not None and hasattr(heads, "head"):
        torch.manual_seed(3)
        torch.nn.init.normal_(heads.head.weight, std=0.02)
        done.append("heads.head.weight~N(0,0.02)")
    return done


def child(
    name: str,
    json_path: str,
    mem_gb: float,
    check_batches: tuple[int, ...],
    size_override: int = 0,
    variant: str = "",
) -> None:
    import resource

    if mem_gb > 0:
        lim = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import warnings

    import torch

    family, _, size, _big = BY_NAME[name]
    if size_override:
        size = size_override
    import compressdrop as _cd0

    rec = Recorder(
        json_path,
        {
            "family": family,
            "model": name,
            "input": f"2x3x{size}x{size}",
            "mem_limit_gb": mem_gb,
            "stage": "build",
            "variant": variant,
            "compressdrop_file": _cd0.__file__,
        },
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(name, size)
    # give BatchNorm real statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size))
    model.eval()
    if variant == "nondegenerate":
        rec.set(variant_changes=make_nondegenerate(model))
    rec.set(build_s=round(time.perf_counter() - t0, 2), params_before=n_params(model))
    x = torch.randn(2, 3, size, size)

    import compressdrop as cd

    # 1. attach
    rec.set(stage="attach")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        try:
            cd.attach(model, example_inputs=x)
            ok, exc = True, None
        except Exception as e:
            ok, exc = False, e
        attach_s = time.perf_counter() - t
    gw = [str(m.message) for m in w if issubclass(m.category, cd.GatingWarning)]
    other = sorted(
        {
            f"{m.category.__name__}: {str(m.message)[:200]}"
            for m in w
            if not issubclass(m.category, cd.GatingWarning)
        }
    )
    reasons: dict[str, int] = {}
    for m in gw:
        k = shorten_reason(m)
        reasons[k] = reasons.get(k, 0) + 1
    rec.set(
        attach_ok=ok,
        attach_s=round(attach_s, 3),
        gating_warnings=len(gw),
        gating_reasons=reasons,
        gating_warning_examples=sorted(set(gw))[:12],
        attach_other_warnings=other[:10],
    )
    if not ok:
        rec.set(attach_error=short_exc(exc), attach_error_info=frames(exc), stage="done")
        return
    gates = list(cd.named_gates(model))
    rec.set(
        gates=len(gates),
        gated_units=int(sum(g.log_sigma.numel() for _, g in gates)),
        params_gated_model=n_params(model),
    )
    model.eval()

    # 2. spread SNRs
    torch.manual_seed(1)
    for _, g in gates:
        with torch.no_grad():
            g.log_sigma.copy_(torch.empty_like(g.log_sigma).uniform_(-3, 1))
    thr = float(torch.cat([g.snr().detach().flatten() for _, g in cd.named_gates(model)]).median())
    rec.set(threshold=thr)

    # 3. prune
    rec.set(stage="prune")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        try:
            slim = cd.prune(model, thr, example_inputs=x)
            ok, exc = True, None
        except Exception as e:
            ok, exc = False, e
        prune_s = time.perf_counter() - t
    pw = sorted({f"{m.category.__name__}: {str(m.message)[:200]}" for m in w})
    rec.set(
        prune_ok=ok, prune_s=round(prune_s, 3), prune_warnings=pw[:10], prune_warning_count=len(w)
    )
    if not ok:
        rec.set(prune_error=short_exc(exc), prune_error_info=frames(exc), stage="done")
        return
    rep = slim.prune_report
    rec.set(
        params_after=n_params(slim),
        prune_max_rel_error=float(rep.max_rel_error),
        units_before=int(rep.units_before),
        units_after=int(rep.units_after),
    )

    # 4. parity on fresh inputs at batch 3
    rec.set(stage="parity")
    try:
        cd.mask_(model, thr)
        model.eval()
        slim.eval()
        torch.manual_seed(2)
        x3 = torch.randn(3, 3, size, size)
        with torch.no_grad():
            a = slim(x3)
            b = model(x3)
            from compressdrop.pruning import unmask_

            unmask_(model)
            c = model(x3)
            cd.mask_(model, thr)
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        eff = float((c - b).abs().max() / c.abs().max().clamp_min(1e-30))
        rec.set(
            parity_rel_error=err,
            parity_ok=bool(err <= 1e-5),
            out_absmax=float(b.abs().max()),
            mask_effect_rel=eff,
        )
    except Exception as e:
        rec.set(parity_error=short_exc(e), parity_error_info=frames(e), parity_ok=False)

    # 5. export
    rec.set(stage="export", export_check_batch_sizes=list(check_batches))
    os.makedirs(ONNX_DIR, exist_ok=True)
    path = os.path.join(ONNX_DIR, f"{name}.onnx")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        try:
            er = cd.export_onnx(slim, x, path, check_batch_sizes=check_batches)
            ok, exc = True, None
        except Exception as e:
            ok, exc = False, e
            er = None
        export_s = time.perf_counter() - t
    rec.set(
        export_ok=ok,
        export_s=round(export_s, 3),
        export_warnings=sorted({f"{m.category.__name__}: {str(m.message)[:200]}" for m in w})[:10],
    )
    if ok:
        rec.set(
            export_provider=er.provider,
            export_rel_errors={str(k): float(v) for k, v in er.max_rel_error.items()},
            onnx_bytes=int(er.bytes),
            onnx_opset=er.opset,
        )
        with contextlib.suppress(OSError):
            os.remove(path)
    else:
        rec.set(export_error=short_exc(exc), export_error_info=frames(exc))
    import resource as r

    rec.set(
        stage="done",
        maxrss_mb=round(r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024, 1),
        total_s=round(time.perf_counter() - t0, 2),
    )


def parent(args) -> None:
    names = [m[1] for m in MODELS]
    if args.only:
        names = args.only.split(",")
    out_path = args.out
    os.makedirs(os.path.join(HERE, "runs"), exist_ok=True)
    results = {}
    if os.path.exists(out_path) and args.only:
        with open(out_path) as f:
            results = {r.get("tag", r["model"]): r for r in json.load(f)["results"]}
    # the children measure the compressdrop of this checkout, whatever the venv installed
    # (first on the path; what PYTHONPATH held stays after it: a sitecustomize shim, say)
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    t_all = time.perf_counter()
    for name in names:
        big = BY_NAME[name][3]
        cb = args.big_batches if big else args.batches
        tag = (
            name
            + (f"_{args.size}" if args.size else "")
            + (f"_{args.variant}" if args.variant else "")
        )
        jp = os.path.join(HERE, "runs", f"{tag}.json")
        os.makedirs(os.path.dirname(jp), exist_ok=True)
        if os.path.exists(jp):
            os.remove(jp)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            name,
            "--json",
            jp,
            "--mem-gb",
            str(args.mem_gb),
            "--batches",
            cb,
            "--size",
            str(args.size),
            "--variant",
            args.variant,
        ]
        t = time.perf_counter()
        log = open(os.path.join(HERE, "runs", f"{tag}.log"), "w")  # noqa: SIM115 (closed below)
        try:
            p = subprocess.run(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
            rc = p.returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        log.close()
        wall = time.perf_counter() - t
        r = {}
        if os.path.exists(jp):
            with open(jp) as f:
                r = json.load(f)
        r.setdefault("model", name)
        r.setdefault("family", BY_NAME[name][0])
        r.update(tag=tag, child_rc=rc, child_timed_out=timed_out, child_wall_s=round(wall, 2))
        if timed_out or (rc not in (0, None)):
            with open(os.path.join(HERE, "runs", f"{tag}.log")) as f:
                tail = f.read()[-1500:]
            r["child_log_tail"] = tail
        results[tag] = r
        print(
            f"{name:22s} rc={rc} timeout={timed_out} wall={wall:6.1f}s stage={r.get('stage')} "
            f"attach={r.get('attach_ok')} gates={r.get('gates')} prune={r.get('prune_ok')} "
            f"parity={r.get('parity_rel_error')} export={r.get('export_ok')}",
            flush=True,
        )
        ordered = list(results.values())
        with open(out_path, "w") as f:
            json.dump(
                {"results": ordered, "last_run_wall_s": round(time.perf_counter() - t_all, 1)},
                f,
                indent=1,
                default=str,
            )
    print(f"total {time.perf_counter() - t_all:.1f}s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--json")
    ap.add_argument("--only")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--mem-gb", type=float, default=8)
    ap.add_argument("--batches", default="1,7,64")
    ap.add_argument("--big-batches", default="1,7")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--variant", default="")
    a = ap.parse_args()
    if a.child:
        child(
            a.child,
            a.json,
            a.mem_gb,
            tuple(int(b) for b in a.batches.split(",")),
            a.size,
            a.variant,
        )
    else:
        parent(a)
