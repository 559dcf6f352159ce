"""Decoded-images-per-second of the training loader, num_workers 0 vs 2 (and any others).

Generates a CUB-layout fixture of photo-sized JPEGs in a temporary folder, builds the train split
through ``load_source`` (so the real index, decode and train transform are measured), and times
full epochs through ``make_loader``. The first epoch of each setting is a warm-up (worker start,
page cache) and is reported separately; the figure is the median over ``--repeats`` epochs, and
the ratio is against num_workers=0 in the same run.

    python benchmarks/loader_throughput.py [--images 256] [--repeats 5] [--workers 0,2]

Prints a Markdown table, then one JSON line for machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from caat_peft.data.fixtures import make_cub_fixture
from caat_peft.data.loader import make_loader
from caat_peft.data.sources import load_source


def _epoch_seconds(loader: torch.utils.data.DataLoader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images to generate")
    parser.add_argument("--image-size", default="500x375", help="JPEG size WxH (CUB is ~500x375)")
    parser.add_argument("--input-size", type=int, default=224, help="model input side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per setting")
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    parser.add_argument("--rrc", action="store_true", help="random-resized-crop train transform")
    parser.add_argument(
        "--main-threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (default: torch's own choice); with "
        "num_workers=0 the batch collation runs there",
    )
    args = parser.parse_args(argv)
    if args.main_threads is not None:
        torch.set_num_threads(args.main_threads)
    load_before = os.getloadavg()[0]

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    n_classes = 8
    per_class_train = max(1, args.images // n_classes)
    # A ViT-B/16-like preprocessing (bicubic, crop_pct 0.9), as timm resolves it.
    data_config = {
        "input_size": (3, args.input_size, args.input_size),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        start = time.perf_counter()
        make_cub_fixture(
            tmp,
            n_classes=n_classes,
            per_class=per_class_train + 1,
            train_per_class=per_class_train,
            image_size=(width, height),
            noise=6.0,
        )
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        train = load_source("cub", tmp, data_config=data_config, random_resized_crop=args.rrc).train
        index_s = time.perf_counter() - start

        rows = []
        for num_workers in workers:
            torch.manual_seed(0)
            loader = make_loader(
                train,
                args.batch_size,
                shuffle=True,
                num_workers=num_workers,
                seed=0,
                drop_last=False,
            )
            warmup_s, n = _epoch_seconds(loader)
            times = [_epoch_seconds(loader)[0] for _ in range(args.repeats)]
            median = statistics.median(times)
            rows.append(
                {
                    "num_workers": num_workers,
                    "images": n,
                    "warmup_epoch_s": round(warmup_s, 3),
                    "median_epoch_s": round(median, 3),
                    "images_per_s": round(n / median, 1),
                    "min_images_per_s": round(n / max(times), 1),
                    "max_images_per_s": round(n / min(times), 1),
                }
            )
            del loader  # stop persistent workers before the next setting starts its own

    load_after = os.getloadavg()[0]
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_vs_first"] = round(row["images_per_s"] / base, 2)

    print(
        f"\nLoader throughput: {len(train)} JPEGs {width}x{height} -> "
        f"{args.input_size}x{args.input_size} train transform "
        f"({'random-resized-crop' if args.rrc else 'resize, random crop, flip'}), "
        f"batch {args.batch_size}, median of {args.repeats} epochs after 1 warm-up; "
        f"main-process torch threads {torch.get_num_threads()}; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after\n"
    )
    print("| num_workers | images/s (median) | range | vs first | warm-up epoch s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['num_workers']} | {r['images_per_s']} | {r['min_images_per_s']}–"
            f"{r['max_images_per_s']} | {r['ratio_vs_first']}× | {r['warmup_epoch_s']} |"
        )
    result = {
        "benchmark": "loader_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}",
        "torch": torch.__version__,
        "images": len(train),
        "image_size": [width, height],
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "random_resized_crop": args.rrc,
        "main_threads": torch.get_num_threads(),
        "loadavg_1min": [round(load_before, 2), round(load_after, 2)],
        "generate_s": round(generate_s, 2),
        "index_s": round(index_s, 3),
        "rows": rows,
    }
    print()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
