"""CA-AT in a plain accelerate training loop: a tiny ViT from random weights on the bundled digits.

    python examples/accelerate_loop.py
    python examples/accelerate_loop.py --mixed_precision bf16 --gradient_accumulation_steps 2
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py    # 2 processes
    torchrun --standalone --nproc_per_node 2 examples/accelerate_loop.py           # the same

(``accelerate launch --cpu --num_processes 2`` starts a single process on a machine without MPI;
the two commands above run two gloo processes on a CPU.)

Well under a minute on a CPU (12 s on 2 cores), nothing downloaded. The loop is an ordinary
accelerate loop; what CA-AT changes is one object, ``ConflictAware``: per micro-batch it attacks the images and keeps
the clean and adversarial gradients apart (``backward_batch``), and once per optimiser step it
averages them over micro-batches and processes, combines them and writes the update into
``.grad`` (``apply``). ``loss.backward()`` / ``accelerator.backward`` are not used: they would
sum both losses into one gradient, which is exactly what the method avoids.

Every weight is trained (``--peft full``): LoRA on a random backbone cannot learn robust features
(recipes/tiny.yaml says what was measured); LoRA on a robust backbone is what ``caat-peft demo``
shows.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from caat_peft import ConflictAware
from caat_peft.attacks import pgd
from caat_peft.config import DataConfig, ModelConfig, PeftConfig
from caat_peft.data import build_splits
from caat_peft.data.subset import limited
from caat_peft.models import build_classifier, preprocessing_for_config

# recipes/tiny.yaml's ViT: 16x16 images in 4x4 patches, width 32, two blocks.
TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names -> autocast


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CA-AT with accelerate on the bundled digits.")
    parser.add_argument("--mixed_precision", choices=sorted(PRECISION), default="no")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32, help="global batch per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--method", choices=["caat", "vanilla"], default="caat")
    parser.add_argument("--gamma", type=float, default=0.8, help="CA-AT cosine threshold")
    parser.add_argument("--lam", type=float, default=0.5, help="vanilla AT weight of g_a")
    parser.add_argument("--peft", choices=["full", "lora"], default="full")
    parser.add_argument("--eps", type=float, default=0.06, help="L-inf radius, pixels in [0,1]")
    parser.add_argument("--alpha", type=float, default=0.02, help="training PGD step size")
    parser.add_argument("--attack_steps", type=int, default=2, help="training PGD steps")
    parser.add_argument("--eval_steps", type=int, default=5, help="evaluation PGD steps")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def get_dataloaders(args: argparse.Namespace, micro_batch: int):
    """Digits 0-4 as 16x16 RGB in [0, 1]: a training loader of global micro-batches (accelerate
    splits each over the processes) and the held-out loader."""
    data_cfg = DataConfig(name="digits", classes=[0, 1, 2, 3, 4], image_size=16)
    splits = build_splits(data_cfg, preprocessing_for_config(ModelConfig(kwargs=TINY_VIT)))
    train_set, _ = limited(splits.train, args.limit)  # stratified, fixed seed
    test_set, _ = limited(splits.test, args.limit)
    train_loader = DataLoader(train_set, batch_size=micro_batch, shuffle=True, drop_last=True)
    eval_loader = DataLoader(test_set, batch_size=128)
    return train_loader, eval_loader, splits.num_classes


def evaluate(accelerator: Accelerator, model, loader, args: argparse.Namespace) -> dict[str, Any]:
    """Clean and PGD accuracy (ε as in training, step ε/4) over the held-out digits."""
    net = accelerator.unwrap_model(model).eval()
    # A random start of each process's own, drawn apart from the training RNG.
    gen = torch.Generator(device=accelerator.device).manual_seed(
        args.seed + accelerator.process_index
    )
    clean, robust = [], []
    for x, y in loader:
        with torch.no_grad():
            correct = net(x).argmax(1) == y
        x_adv = pgd(
            net, x, y, eps=args.eps, alpha=args.eps / 4, steps=args.eval_steps, generator=gen
        )
        with torch.no_grad():
            correct_adv = net(x_adv).argmax(1) == y
        # gather_for_metrics drops what accelerate repeated to give every process a full batch
        correct, correct_adv = accelerator.gather_for_metrics((correct, correct_adv))
        clean.append(correct)
        robust.append(correct_adv)
    clean_t, robust_t = torch.cat(clean).float(), torch.cat(robust).float()
    return {
        "clean_acc": clean_t.mean().item(),
        "pgd_acc": robust_t.mean().item(),
        "n": len(clean_t),
    }


def _summary(logged: list[dict[str, Any]]) -> str:
    """The epoch's mean of what ``apply`` returned (already averaged over processes)."""
    finite = [s for s in logged if s["finite"]]
    parts = []
    for key in ("loss_clean", "loss_adv", "acc_adv", "cos"):
        values = [s[key] for s in finite if s.get(key) is not None]
        if values:  # standard training (γ = 1, λ = 0) has no adversarial pass
            parts.append(f"{key} {sum(values) / len(values):.3f}")
    projected = sum(bool(s.get("projected")) for s in finite)
    parts.append(f"projected {projected}/{len(logged)} steps")
    return " ".join(parts)


def train_one_epoch(
    accelerator: Accelerator, model, ca: ConflictAware, loader, optimizer, scheduler
) -> list[dict[str, Any]]:
    """One pass over ``loader``; returns the stats of every optimiser step."""
    model.train()
    logged = []
    for x, y in loader:
        with accelerator.accumulate(model):
            ca.backward_batch(x, y)  # attack, then g_c and g_a of this micro-batch, apart
            if accelerator.sync_gradients:  # the last micro-batch of an optimiser step
                logged.append(ca.apply())  # combine the averaged g_c, g_a into .grad
                # a non-finite step leaves .grad None (or NaN for fp16's scaler): no change
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    return logged


def training_function(args: argparse.Namespace) -> dict[str, Any]:
    # split_batches: --batch_size is the global batch whatever the process count, so that
    # `python` and `accelerate launch` runs take the same steps (and the schedule steps once each).
    # Several processes without a GPU (torchrun, `accelerate launch --multi_gpu`): accelerate
    # sets up its gloo group only when asked for the CPU; otherwise each process trains alone.
    several_on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=args.cpu or several_on_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if args.mixed_precision == "fp16" and accelerator.scaler is None:
        raise SystemExit("fp16 needs accelerate's loss scaler (a GPU); on a CPU use bf16")
    micro_batch, rest = divmod(args.batch_size, args.gradient_accumulation_steps)
    if rest or micro_batch % accelerator.num_processes:
        raise SystemExit(
            f"--batch_size {args.batch_size} must split evenly into "
            f"{args.gradient_accumulation_steps} micro-batches over {accelerator.num_processes} "
            "processes"
        )
    set_seed(args.seed)
    train_loader, eval_loader, num_classes = get_dataloaders(args, micro_batch)
    model = build_classifier(
        ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT),
        PeftConfig(method=args.peft, r=4, alpha=8),
        num_classes,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    total = args.epochs * math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    # After prepare: a DDP-wrapped model gets DDP's own gradient sync switched off, both
    # gradients are reduced here instead (and accelerate's fp16 scaler, if any, is used).
    ca = ConflictAware(
        model,
        method=args.method,
        gamma=args.gamma,
        lam=args.lam,
        attack={"eps": args.eps, "alpha": args.alpha, "steps": args.attack_steps},
        precision=PRECISION[args.mixed_precision],
        accelerator=accelerator,
    )
    for epoch in range(1, args.epochs + 1):
        logged = train_one_epoch(accelerator, model, ca, train_loader, optimizer, scheduler)
        accelerator.print(f"epoch {epoch}: {_summary(logged)}")
    result = evaluate(accelerator, model, eval_loader, args)
    accelerator.print(
        f"held-out: clean accuracy {result['clean_acc']:.3f}, PGD-{args.eval_steps} accuracy "
        f"{result['pgd_acc']:.3f} ({result['n']} digits)"
    )
    accelerator.end_training()
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate; returns the held-out ``clean_acc``, ``pgd_acc`` and ``n``."""
    return training_function(parse_args(argv))


if __name__ == "__main__":
    main()
