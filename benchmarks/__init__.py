"""Reproducible performance measurements of caat-peft (not tests).

    python -m benchmarks --quick      # a few minutes on 2 CPU cores, reduced workload
    python -m benchmarks              # ViT-Ti at 224 px, batch 16 (the goals' workload)

Every figure is a ratio against a baseline measured in the same run, interleaved, as medians of
repeats after a warm-up. Each section prints a Markdown table; the last line printed is one JSON
object with every figure. See ``docs/benchmarks.md`` for the figures and what they mean.

Modules: ``bench_common`` (workload, timing), ``bench_step`` (CA-AT vs vanilla, fast vs
reference, FLOP utilisation), ``bench_attack`` (PGD vs torchattacks), ``bench_memory`` (peak
RSS), ``bench_accuracy`` (bf16 vs fp32 robust accuracy on the demo), ``bench_scaling``
(2-process CPU runs). ``loader_throughput.py`` is a separate script (data loading).
"""
