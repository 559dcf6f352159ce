"""GPU benchmark of the adversarial PEFT step: ``python -m benchmarks.gpu [--out gpu_bench.json]``.

One command, sized for ≤ 8 minutes on one H100 / H200-class GPU. At 224 px, batch 64, for timm
``vit_base_patch16_224`` and ``swin_small_patch4_window7_224`` (random weights, through the
product's ``build_classifier``), each with the bottleneck adapter and with LoRA r = 8, one
adversarial training step (PGD-10 L∞, the clean and adversarial gradients, combine, AdamW step:
``caat_peft.training.step.training_step``) is timed, interleaved in the same rounds, as

* ``fp32``: float32 eager, vanilla (λ = 0.5) and CA-AT (γ = 0.8);
* ``fast``: the product's fast path, bf16 autocast + ``torch.compile`` (``prepare_model``);
* ``reference``: the authors'-style CA-AT step of ``bench_step`` (float32 eager, torchattacks
  PGD, two ``.backward()`` passes with flattened ``.grad`` copies).

Reported: images/s, model-FLOP utilisation (``FlopCounterMode`` FLOPs of one step / step time /
the GPU's dense datasheet peak, null for an unknown GPU), CA-AT / vanilla step time and the fast
path's speed-up over the reference, each ratio with its spread; a ratio whose rounds do not
settle is reported as noisy (``interleaved_until_stable``). Vanilla and CA-AT train the same model
(two optimisers), so one compilation serves both.

Without CUDA it refuses to run, except ``--device cpu --tiny``: the same code on ViT-Ti at 32 px,
batch 2, PGD-1, two rounds (a smoke test of the script, seconds; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# (substring of torch.cuda.get_device_name(), dense peak TFLOP/s: bf16, tf32, fp32). Datasheet
# figures without sparsity; the first match wins, so the more specific names come first.
PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIE", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

MODELS = ("vit_base_patch16_224", "swin_small_patch4_window7_224")
PEFTS = ("adapter", "lora")  # the adapter first: the figure the issue asks for


@dataclass(frozen=True)
class Setup:
    """The workload and how many rounds each configuration gets."""

    image_size: int
    batch: int
    pgd_steps: int
    models: tuple[str, ...]
    pefts: tuple[str, ...]
    min_rounds: int
    max_rounds: int
    target_spread: float
    compile_backend: str  # inductor: the product's path; eager: tracing only (the CPU smoke)


def peak_tflops(device_name: str | None) -> dict[str, float] | None:
    """Dense peaks of a known GPU, None for anything else (MFU is then reported as null)."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, peaks in PEAKS_TFLOPS:
        if key.upper() in name:
            return peaks
    return None


def fp32_peak_key() -> str:
    """Which peak an fp32 matmul can reach: TF32 only if the process allows it."""
    import torch

    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.bench_common import TARGET_SPREAD

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_bench.json", help="JSON file to write")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="smoke mode: tiny sizes, seconds")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would overrun this")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64)")
    p.add_argument("--min-rounds", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--target-spread", type=float, default=TARGET_SPREAD)
    return p.parse_args(argv)


def _setup(args: argparse.Namespace) -> Setup:
    if args.tiny:
        return Setup(
            image_size=32,
            batch=args.batch or 2,
            pgd_steps=1,
            models=("vit_tiny_patch16_224",),
            pefts=PEFTS,
            min_rounds=args.min_rounds or 2,
            max_rounds=args.max_rounds or 2,
            target_spread=args.target_spread,
            compile_backend="eager",  # inductor's C++ build would take minutes on one CPU
        )
    return Setup(
        image_size=224,
        batch=args.batch or 64,
        pgd_steps=10,
        models=MODELS,
        pefts=PEFTS,
        min_rounds=args.min_rounds or 5,
        max_rounds=args.max_rounds or 10,
        target_spread=args.target_spread,
        compile_backend="inductor",
    )


def _refusal(args: argparse.Namespace) -> str | None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return (
            "benchmarks.gpu: no CUDA device here; refusing (a CPU smoke run: --device cpu --tiny)"
        )
    if args.device == "cpu" and not args.tiny:
        return "benchmarks.gpu: the full workload needs a GPU; on a CPU only --tiny runs"
    return None


# --------------------------------------------------------------------------------------------
# One configuration: a model with one PEFT method


def build(setup: Setup, model_name: str, peft: str, device: Any) -> Any:
    """Random-weight classifier through the product's ``build_classifier``, on ``device``."""
    import torch

    from benchmarks.bench_common import NUM_CLASSES
    from caat_peft.config import ModelConfig, PeftConfig
    from caat_peft.models import build_classifier

    torch.manual_seed(0)
    # timm's models take ``img_size`` (the smoke mode's 32 px); at 224 px the default is kept
    kwargs = {"img_size": setup.image_size} if setup.image_size != 224 else {}
    model_cfg = ModelConfig(name=model_name, kwargs=kwargs)
    peft_cfg = PeftConfig(method=peft, r=8, alpha=16)
    return build_classifier(model_cfg, peft_cfg, NUM_CLASSES).to(device)


def trainees_on(model: Any, steps: int) -> dict[str, Any]:
    """Vanilla and CA-AT on the same model (their own AdamW): one compilation serves both."""
    from benchmarks.bench_common import ALPHA, EPS, GAMMA, LAM, Trainee
    from caat_peft.config import AttackConfig, TrainConfig
    from caat_peft.gradients import make_combiner
    from caat_peft.models import trainable_parameters
    from caat_peft.objectives import build_objective
    from caat_peft.training.optim import make_optimizer

    named = trainable_parameters(model)
    out = {}
    for kind in ("vanilla", "caat"):
        optimizer = make_optimizer(named, TrainConfig(lr=1e-3))
        objective = build_objective("pgd-ce", AttackConfig(eps=EPS, alpha=ALPHA, steps=steps))
        combiner = make_combiner(kind, lam=LAM, gamma=GAMMA)
        out[kind] = Trainee(model, named, optimizer, objective, combiner)
    return out


def make_device_batch(setup: Setup, device: Any) -> Any:
    from benchmarks.bench_common import Workload, make_batch
    from caat_peft.training.step import MicroBatch

    b = make_batch(Workload(image_size=setup.image_size, batch=setup.batch, steps=setup.pgd_steps))
    return MicroBatch(b.x.to(device), b.y.to(device), b.init_delta.to(device))


def count_flops(model: Any, batch: Any, steps: int) -> int:
    """FLOPs of one float32 CA-AT step on a copy with unfused attention (so that every
    attention matmul is counted whatever kernel the device would pick)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_step import run_step

    counted = copy.deepcopy(model)
    for module in counted.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    counter = FlopCounterMode(display=False)
    with counter:
        run_step(trainees_on(counted, steps)["caat"], batch)
    return counter.get_total_flops()


def _compiled(setup: Setup, base: Any, steps: int, batch: Any, sync: Callable) -> dict[str, Any]:
    """The fast path's model (bf16 + compile) and its compilation time (its first step)."""
    from benchmarks.bench_step import run_step
    from caat_peft.training.fastpath import prepare_model

    model = copy.deepcopy(base)
    if setup.compile_backend == "inductor":
        prepare_model(model, precision="bf16", compile=True)  # exactly the product's path
    else:
        prepare_model(model, precision="bf16")
        model.compile(backend=setup.compile_backend)
    fast = trainees_on(model, steps)
    sync()
    started = time.perf_counter()
    for t in fast.values():  # both trainees: the train-mode and eval-mode graphs, once each
        run_step(t, batch, "bf16")
    sync()
    return {"trainees": fast, "compile_seconds": time.perf_counter() - started}


# The timed functions of one configuration, and the figures read from them.
MODES = {
    "fp32": {"caat": "fp32_caat", "vanilla": "fp32_vanilla", "precision": "fp32"},
    "fast": {"caat": "fast_caat", "vanilla": "fast_vanilla", "precision": "bf16"},
    "reference": {"caat": "reference", "vanilla": None, "precision": "fp32"},
}


def _timed_fns(setup: Setup, base: Any, batch: Any, sync: Callable) -> dict[str, Any]:
    """Every step to time, by name; the fast path is left out (with the reason) if it fails
    to compile, so that a compiler problem does not cost the float32 figures."""
    from benchmarks.bench_common import GAMMA
    from benchmarks.bench_step import make_torchattacks_pgd, reference_caat_step, run_step

    fp32 = trainees_on(copy.deepcopy(base), setup.pgd_steps)
    ref = trainees_on(copy.deepcopy(base), setup.pgd_steps)["caat"]
    ref_attack = make_torchattacks_pgd(ref.model, setup.pgd_steps)
    fns: dict[str, Callable[[], Any]] = {
        "fp32_vanilla": lambda: run_step(fp32["vanilla"], batch),
        "fp32_caat": lambda: run_step(fp32["caat"], batch),
        "reference": lambda: reference_caat_step(
            ref.model, ref.params, ref_attack, ref.optimizer, batch.x, batch.y, GAMMA
        ),
    }
    extra: dict[str, Any] = {}
    try:
        fast = _compiled(setup, base, setup.pgd_steps, batch, sync)
    except Exception as exc:  # reported in the JSON; the rest still runs
        extra["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    else:
        extra["compile_seconds"] = fast["compile_seconds"]
        fns["fast_vanilla"] = lambda: run_step(fast["trainees"]["vanilla"], batch, "bf16")
        fns["fast_caat"] = lambda: run_step(fast["trainees"]["caat"], batch, "bf16")
    return {"fns": fns, **extra}


def _mode_figures(
    run: Any, mode: str, setup: Setup, flops: int, peaks: dict[str, float] | None
) -> dict[str, Any]:
    """images/s, MFU, CA-AT / vanilla and the speed-up over the reference of one mode."""
    from benchmarks.bench_common import spread

    names = MODES[mode]
    med = run.medians()
    caat_s = med[names["caat"]]
    peak_key = "bf16" if names["precision"] == "bf16" else fp32_peak_key()
    out: dict[str, Any] = {
        "seconds_caat": caat_s,
        "seconds_spread_caat": spread(run.times[names["caat"]]),
        "images_per_s_caat": setup.batch / caat_s,
        "achieved_tflops_caat": flops / caat_s / 1e12,
        "peak": peak_key,
        "mfu_caat": flops / caat_s / (peaks[peak_key] * 1e12) if peaks else None,
    }
    if names["vanilla"]:
        vanilla_s = med[names["vanilla"]]
        out["seconds_vanilla"] = vanilla_s
        out["images_per_s_vanilla"] = setup.batch / vanilla_s
        out["caat_over_vanilla_step"] = run.ratio(names["caat"], names["vanilla"]).to_json()
    if mode != "reference":
        out["speedup_over_reference"] = run.ratio("reference", names["caat"]).to_json()
    return out


def measure_config(
    setup: Setup, model_name: str, peft: str, device: Any, peaks: dict[str, float] | None
) -> dict[str, Any]:
    """One model + PEFT method: every mode timed in the same interleaved rounds."""
    import torch

    from benchmarks.bench_common import interleaved_until_stable, loadavg

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()  # each configuration compiles its own model from a clean cache
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = loadavg()
    base = build(setup, model_name, peft, device)
    batch = make_device_batch(setup, device)
    flops = count_flops(base, batch, setup.pgd_steps)
    timed = _timed_fns(setup, base, batch, sync)
    fns = timed.pop("fns")
    watched = [("fp32_caat", "fp32_vanilla")]
    if "fast_caat" in fns:
        watched += [("fast_caat", "fast_vanilla"), ("reference", "fast_caat")]
    run = interleaved_until_stable(
        fns,
        watched,
        min_repeats=setup.min_rounds,
        max_repeats=setup.max_rounds,
        target_spread=setup.target_spread,
        warmup=1,
        sync=sync,
    )
    modes = [m for m in MODES if MODES[m]["caat"] in fns]
    return {
        "trainable_parameters": sum(p.numel() for p in base.parameters() if p.requires_grad),
        "step_gflop": flops / 1e9,
        "rounds": run.rounds,
        "stable": run.stable,
        **timed,
        "modes": {m: _mode_figures(run, m, setup, flops, peaks) for m in modes},
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "load": {"before": before, "after": loadavg()},
    }


# --------------------------------------------------------------------------------------------
# The whole run: configurations in order of importance, within the time budget


def _header(setup: Setup, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from benchmarks.bench_common import loadavg, machine

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.gpu " + " ".join(args.argv),
        "device": str(device),
        "device_name": name,
        "torch_cuda_build": torch.version.cuda,
        "peak_tflops": peak_tflops(name),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "machine": machine(),
        "setup": asdict(setup),
        "budget_s": args.budget_s,
        "load_start": loadavg(),
        "configs": {},
    }


def run_all(
    setup: Setup,
    args: argparse.Namespace,
    device: Any,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Measure every configuration; after the first, skip any whose estimated time (the
    longest one so far) would take the run past ``--budget-s`` (``clock``: for tests)."""
    from benchmarks.bench_common import loadavg

    report = _header(setup, args, device)
    configs = report["configs"]
    started = clock()
    durations: list[float] = []
    for peft in setup.pefts:
        for model_name in setup.models:
            key = f"{model_name} + {peft}"
            elapsed = clock() - started
            estimate = max(durations) if durations else 0.0
            if durations and elapsed + estimate > args.budget_s:
                configs[key] = {
                    "skipped": "time budget",
                    "elapsed_s": round(elapsed, 1),
                    "estimate_s": round(estimate, 1),
                }
                continue
            t0 = clock()
            try:
                configs[key] = measure_config(
                    setup, model_name, peft, device, report["peak_tflops"]
                )
            except Exception as exc:  # one failure must not lose the others
                configs[key] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            durations.append(clock() - t0)
            configs[key]["seconds"] = round(durations[-1], 1)
            print(f"{key}: {durations[-1]:.0f} s", file=sys.stderr, flush=True)
            write_json(report, args.out)  # a run cut short keeps what it measured
    report["load_end"] = loadavg()
    report["seconds"] = round(clock() - started, 1)
    return report


def write_json(report: dict[str, Any], path: str) -> None:
    from benchmarks.bench_common import to_jsonable

    with open(path, "w") as fh:
        fh.write(json.dumps(report, indent=2, default=to_jsonable) + "\n")


def _ratio_text(entry: dict[str, Any] | None) -> str:
    from benchmarks.bench_common import Ratio

    if entry is None:
        return ""
    return Ratio(entry["value"], entry["spread"], entry["rounds"], entry["stable"]).text()


def markdown(report: dict[str, Any]) -> str:
    """One row per configuration and mode; skipped and failed configurations say so."""
    from benchmarks.bench_common import table

    rows: list[list[Any]] = []
    for key, cfg in report["configs"].items():
        if "modes" not in cfg:
            why = f"skipped: {cfg['skipped']}" if "skipped" in cfg else cfg.get("error", "?")
            rows.append([key, why, "", "", "", "", ""])
            continue
        for mode, m in cfg["modes"].items():
            mfu = "n/a" if m["mfu_caat"] is None else f"{m['mfu_caat']:.3f}"
            rows.append(
                [key, mode, m["images_per_s_caat"], m.get("images_per_s_vanilla", ""), mfu,
                 _ratio_text(m.get("caat_over_vanilla_step")),
                 _ratio_text(m.get("speedup_over_reference"))]
            )  # fmt: skip
    headers = ["model + PEFT", "mode", "CA-AT img/s", "vanilla img/s", "MFU (CA-AT)",
               "CA-AT / vanilla", "over reference"]  # fmt: skip
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    refusal = _refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    import torch

    setup = _setup(args)
    report = run_all(setup, args, torch.device(args.device))
    write_json(report, args.out)
    print(f"# caat-peft GPU benchmark ({report['device_name'] or report['device']})\n")
    print(markdown(report))
    print(f"\n{report['seconds']} s in all; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
