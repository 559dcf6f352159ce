"""The robustness evaluation: clean accuracy, every (attack, ε) pair, AutoAttack, sanity checks.

One pass over the data: each batch is attacked by every (attack, ε) pair still missing it, and
per-sample correctness is appended to the pair's resume file. A sample counts as robust for an
attack only if it is classified correctly both clean and under the attack (the AutoAttack /
RobustBench convention: the clean input is itself inside the ε-ball).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from tqdm import tqdm

from caat_peft.data.subset import SUBSET_SEED, limited
from caat_peft.errors import UserError
from caat_peft.evaluation.registry import (
    AttackBudget,
    AttackConfig,
    attack_config,
    check_norm,
    eps_label,
    make_attack,
    parse_eps_list,
    resolve_attack_names,
    resolve_budget,
)
from caat_peft.evaluation.sanity import RANDOMNESS_PASSES, run_sanity_checks, sanity_plan
from caat_peft.evaluation.store import PairState, ResultStore
from caat_peft.stats import CONFIDENCE, WILSON, wilson_interval

RESULT_FORMAT = "caat-peft-eval/1"
_RANGE_SLACK = 1e-4


# ---------------------------------------------------------------------------------------------
# data


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("pixel_values", "image", "images", "x") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "y", "target") if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if x is None or y is None:
        raise UserError(
            "each data item must be (images, labels) or a dict with 'pixel_values'/'image' and "
            f"'label'; got {type(batch).__name__}"
        )
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.dim() == 0:  # a single sample
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    return x, y


class _Source:
    """Deterministic batches of (start index, images, labels), optionally a stratified subset.

    Order matters: resume files are indexed by sample position, so a shuffling loader is refused.
    Map-style datasets (also those behind a non-shuffling DataLoader) are re-batched to
    ``batch_size`` and can start at any index without reading the skipped samples.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        limit: int | None,
        num_workers: int,
        subset_seed: int = SUBSET_SEED,
    ) -> None:
        self.batch_size, self.num_workers = batch_size, num_workers
        self.subset: dict[str, Any] | None = None
        self.dataset: Dataset | None = None
        self.iterable: Iterable | None = None
        self.collate_fn = None
        self.pin_memory = False
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
        ):
            if len(data[0]) != len(data[1]):
                raise UserError(
                    f"images ({len(data[0])}) and labels ({len(data[1])}) differ in length; "
                    "pass matching tensors"
                )
            self.dataset = TensorDataset(data[0], data[1])
        elif isinstance(data, DataLoader):
            if isinstance(data.sampler, RandomSampler):
                raise UserError(
                    "the evaluation DataLoader shuffles; build it with shuffle=False (results "
                    "are stored per sample position)"
                )
            ds = data.dataset
            if (
                not isinstance(ds, IterableDataset)
                and hasattr(ds, "__len__")
                and isinstance(data.sampler, SequentialSampler)
                and type(data.batch_sampler) is BatchSampler
            ):
                self.dataset, self.collate_fn = ds, data.collate_fn
                self.num_workers, self.pin_memory = data.num_workers, data.pin_memory
            else:
                self.iterable = data
        elif (
            isinstance(data, Dataset)
            and not isinstance(data, IterableDataset)
            and hasattr(data, "__len__")
        ):
            self.dataset = data
        elif isinstance(data, Iterable) and iter(data) is not data:
            self.iterable = data
        else:
            raise UserError(
                "data must be a Dataset, a non-shuffling DataLoader, an (images, labels) tensor "
                f"pair or a re-iterable of (images, labels) batches; got {type(data).__name__}"
            )
        if limit is not None:
            self._stratify(limit, subset_seed)

    def _stratify(self, limit: int, seed: int) -> None:
        """Cut to a seeded, class-stratified ``limit`` (a prefix of a class-ordered list would
        hold a few classes only); a stream cannot be sampled that way, so it is refused."""
        if self.dataset is None:
            raise UserError(
                f"limit={limit} needs a map-style Dataset (a stratified subset picks images by "
                "index); pass the Dataset or a non-shuffling DataLoader over it, or drop limit"
            )
        self.dataset, self.subset = limited(self.dataset, limit, seed)

    @property
    def n(self) -> int | None:
        if self.dataset is None:
            return None
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if self.dataset is not None:
            n = self.n or 0
            if start >= n:
                return
            loader = DataLoader(
                Subset(self.dataset, range(start, n)),
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                **({"collate_fn": self.collate_fn} if self.collate_fn is not None else {}),
            )
            pos = start
            for batch in loader:
                x, y = _split_batch(batch)
                yield pos, x, y
                pos += len(y)
            return
        yield from self._rechunk(start)

    def _rechunk(self, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        pending, pos, emit = 0, 0, start
        for batch in self.iterable or ():
            x, y = _split_batch(batch)
            lo = max(0, start - pos)
            if len(y) > lo:
                xs.append(x[lo:])
                ys.append(y[lo:])
                pending += len(y) - lo
            pos += len(y)
            while pending >= bs:
                x_all, y_all = torch.cat(xs), torch.cat(ys)
                yield emit, x_all[:bs], y_all[:bs]
                emit += bs
                xs, ys, pending = [x_all[bs:]], [y_all[bs:]], pending - bs
        if pending:
            yield emit, torch.cat(xs), torch.cat(ys)


def _prepare(
    x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move to ``device`` as float pixels in [0, 1] and int64 labels; refuse normalised input."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0  # timm's create_transform(normalize=False) yields uint8
    if not x.is_floating_point():
        raise UserError(f"images must be float pixels in [0, 1]; got dtype {x.dtype}")
    if x.dim() != 4:
        raise UserError(f"images must be batches N×C×H×W; got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise UserError(
            f"images must be pixels in [0, 1] but range over [{lo:.3g}, {hi:.3g}]; drop "
            "Normalize from the evaluation transform (the model normalises inside)"
        )
    x = x.clamp(0.0, 1.0)
    if y.dim() != 1 or y.is_floating_point():
        raise UserError(
            f"labels must be a 1-D integer tensor; got shape {tuple(y.shape)} {y.dtype}"
        )
    return x, y.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# model helpers


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class and state dict: resume state must belong to the same weights."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        try:
            h.update(flat.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # exotic dtypes: hash a float copy
            h.update(flat.float().numpy().tobytes())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards.

    Parameters are frozen because torchattacks' FAB calls ``.backward()``, which would otherwise
    accumulate attack gradients into ``param.grad`` (and cost a parameter backward pass).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state fork_rng must save (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for one attack call without disturbing the caller's RNG streams.

    torchattacks' APGD/FAB/Square call ``torch.manual_seed`` themselves: forking keeps that local.
    """
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        yield


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from (seed, attack, ε, sample index): batches are reproducible."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def _project(
    x: torch.Tensor, adv: torch.Tensor, eps: float, norm: str
) -> tuple[torch.Tensor, float, int]:
    """Clip an attack's output into the ε-ball ∩ [0, 1]; report the overshoot and NaN samples.

    The projection is a no-op for a correct attack (up to rounding). It exists so that a buggy
    attack can only make the evaluation more conservative, never report success outside the
    budget; a non-finite output (e.g. an attack normalising a zero gradient) reverts the whole
    sample to the clean input, i.e. counts as not fooled.
    """
    adv = adv.detach().to(x.dtype)
    bad = ~torch.isfinite(adv).flatten(1).all(dim=1)
    if bad.any():
        adv = torch.where(bad.view(-1, *([1] * (x.dim() - 1))), x, adv)
    delta = adv - x
    range_excess = max(float((adv - 1).max()), float((-adv).max()), 0.0) if adv.numel() else 0.0
    if norm == "linf":
        size = delta.flatten(1).abs().amax(dim=1)
        delta = delta.clamp(-eps, eps)
    else:
        size = delta.flatten(1).norm(dim=1)
        factor = (eps / size.clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
    excess = max(float((size - eps).max()) if size.numel() else 0.0, range_excess, 0.0)
    return (x + delta).clamp(0.0, 1.0), excess, int(bad.sum())


def _attack_subset(
    cfg: AttackConfig,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    norm: str,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, float, int]:
    """Attack the samples where ``mask`` holds; returns which of them are still correct.

    Only still-correct samples are attacked (a misclassified sample is already non-robust), as
    the AutoAttack protocol does; samples outside ``mask`` come back False.
    """
    idx = mask.nonzero().flatten()
    correct = torch.zeros_like(mask)
    if idx.numel() == 0:
        return correct, 0.0, 0
    xs, ys = x[idx], y[idx]
    with _seeded(seed, device):
        attack = make_attack(cfg, model, eps, seed=seed, device=device)
        adv = attack(xs, ys)
    adv, excess, nonfinite = _project(xs, adv, eps, norm)
    correct[idx] = _predict(model, adv) == ys
    return correct, excess, nonfinite


def _probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Model properties from the first batch: classes, determinism, logits, input gradients."""
    with torch.no_grad():
        out1 = model(x)
        if not isinstance(out1, torch.Tensor) or out1.dim() != 2 or out1.shape[0] != x.shape[0]:
            shape = tuple(out1.shape) if isinstance(out1, torch.Tensor) else type(out1).__name__
            raise UserError(
                f"the model must return logits of shape (N, classes); got {shape} — unwrap the "
                "model output (e.g. `.logits`) before evaluating"
            )
        outs = [out1] + [model(x) for _ in range(RANDOMNESS_PASSES - 1)]
    n_classes = int(out1.shape[1])
    # fra31's randomness test: every pair of passes, per-sample outputs scaled to unit L2 norm
    # (so the threshold does not depend on the logits' scale), largest L2 distance.
    unit = [o.float() / (o.float().norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max(
        (float((unit[i] - unit[j]).norm(dim=1).max()) for i in range(len(unit)) for j in range(i)),
        default=0.0,
    )
    preds = torch.stack([o.argmax(1) for o in outs])
    flips = int((preds != preds[0]).any(dim=0).sum())
    probabilities = bool(
        (out1 >= 0).all() and (out1 <= 1).all() and (out1.sum(1) - 1).abs().max() < 1e-3
    )
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        if not logits.requires_grad:
            raise UserError(
                "the model output does not depend differentiably on the input (no grad_fn); "
                "white-box attacks need input gradients — remove torch.no_grad()/detach() from "
                "the model's forward"
            )
        loss = F.cross_entropy(logits.float(), y.clamp(0, n_classes - 1), reduction="sum")
        grad = torch.autograd.grad(loss, xg)[0]
    ok = logits.detach().argmax(1) == y
    zero = (grad.flatten(1).abs().amax(1) == 0) & ok
    return {
        "n_classes": n_classes,
        "sample_shape": list(x.shape[1:]),
        "passes": RANDOMNESS_PASSES,
        "pred_flips": flips,
        "max_output_diff": diff,
        "probabilities": probabilities,
        "zero_grad": int(zero.sum()),
        "grad_checked": int(ok.sum()),
    }


def _pick_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    param = next(iter(model.parameters()), None)
    here = param.device if param is not None else torch.device("cpu")
    if device is None:
        return here
    if device == "auto":  # the command line's default: a GPU when there is one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(
            f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'"
        ) from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices; "
            "use cuda:0 .. cuda:N-1"
        )
    if target.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if target != here:
        model.to(target)
    return target


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate(
    model: torch.nn.Module,
    data: Any,
    *,
    attacks: str | Sequence[str] | None = None,
    eps_list: str | Sequence[float | str] | None = None,
    norm: str = "linf",
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    budget: str | AttackBudget | Mapping[str, int] | None = "standard",
    resume_dir: str | Path | None = None,
    sanity: bool = True,
    progress: bool = True,
    tolerance: float = 0.01,
    num_workers: int = 0,
    subset_seed: int = SUBSET_SEED,
) -> dict:
    """Evaluate ``model`` against every attack × ε and return the result as a JSON-able dict.

    ``model`` maps pixels in [0, 1] (N×C×H×W) to logits; ``data`` is a Dataset, a non-shuffling
    DataLoader, an (images, labels) tensor pair or a re-iterable of batches. ``attacks`` are
    names or presets (see :mod:`caat_peft.evaluation.registry`; None = the default set) and
    ``eps_list`` the ε grid (None = 8/16/24/32 / 255 for L∞, 0.5 / 1.0 for L2). ``budget`` is
    "standard" (the AutoAttack protocol), "fast", or an :class:`AttackBudget`. With
    ``resume_dir``, per-sample results are saved after every batch and a re-run skips what is
    done. ``tolerance`` is the sanity checks' slack as a fraction of samples (at least 1 sample).
    ``limit`` evaluates a class-stratified subset drawn with ``subset_seed`` (the same images
    for every model given the same data, limit and seed; recorded under ``config["subset"]``).
    The model is evaluated in eval mode with frozen parameters; both are restored afterwards.
    """
    norm = check_norm(norm)
    names = resolve_attack_names(attacks, norm)
    eps_grid = parse_eps_list(eps_list, norm)
    budget = resolve_budget(budget)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be an integer ≥ 1")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit={limit!r} must be a positive integer (or None for all samples)")
    if not 0 <= tolerance < 1:
        raise UserError(f"tolerance={tolerance!r} must be a fraction in [0, 1), e.g. 0.01")
    device = _pick_device(model, device)
    source = _Source(data, batch_size, limit, num_workers, subset_seed)

    # DataLoader iterators and the attacks draw from torch's global RNG: fork it so that the
    # caller's random stream is the same with or without an evaluation in between.
    with torch.random.fork_rng(devices=_rng_devices(device)), _frozen_eval(model):
        batches = source.batches(0)
        first = next(batches, None)
        batches.close()  # shuts down loader workers started just for the probe
        if first is None:
            raise UserError("the evaluation data is empty; check the dataset path and split")
        px, py = _prepare(first[1], first[2], device)
        probe = _probe(model, px, py)
        n_classes = probe["n_classes"]
        configs: dict[str, AttackConfig] = {
            a: attack_config(a, norm, budget, n_classes) for a in names
        }
        if norm == "l2" and min(probe["sample_shape"][-2:]) < 5:
            for a in ("square", "autoattack"):
                if a in names:
                    raise UserError(
                        f"attack {a!r} in L2 needs images of at least 5×5 pixels (torchattacks' "
                        f"Square); got {probe['sample_shape']} — drop {a!r} or use norm='linf'"
                    )
        pairs: list[tuple[str, float]] = [(a, e) for e in eps_grid for a in names]
        plan = None
        if sanity:
            plan = sanity_plan(names, eps_grid, norm, math.prod(probe["sample_shape"]))
            for a, e in plan.pairs:
                if a not in configs:
                    configs[a] = attack_config(a, norm, budget, n_classes)
                if all((a, eps_label(e, norm)) != (b, eps_label(f, norm)) for b, f in pairs):
                    pairs.append((a, e))

        fingerprint = model_fingerprint(model)
        store = ResultStore(resume_dir)
        store.open(
            fingerprint=fingerprint,
            norm=norm,
            seed=seed,
            n_classes=n_classes,
            subset=source.subset,
        )
        states: dict[tuple[str, str], PairState] = {}
        for a, e in pairs:
            lb = eps_label(e, norm)
            states[(a, lb)] = store.load_pair(a, e, lb, configs[a].describe())

        _run_batches(model, source, store, states, configs, norm, seed, device, n_classes, progress)

    n = len(store.labels) if source.n is None else min(source.n, len(store.labels))
    if n == 0:
        raise UserError("the evaluation data is empty; check the dataset path and split")
    return _assemble(
        n=n,
        store=store,
        states=states,
        names=names,
        eps_grid=eps_grid,
        norm=norm,
        plan=plan,
        probe=probe,
        configs=configs,
        config={
            "attacks": names,
            "eps": [{"label": eps_label(e, norm), "value": e} for e in eps_grid],
            "norm": norm,
            "batch_size": batch_size,
            "limit": limit,
            "subset": source.subset,
            "seed": seed,
            "tolerance": tolerance,
            "budget": asdict(budget),
            "protocol": "standard" if budget.is_standard else "reduced",
            "device": str(device),
            "model_fingerprint": fingerprint,
            "n_classes": n_classes,
            "input_shape": probe["sample_shape"],
            "resume_dir": str(resume_dir) if resume_dir is not None else None,
            "versions": {"torch": torch.__version__, "torchattacks": torchattacks.__version__},
        },
    )


def _run_batches(
    model: torch.nn.Module,
    source: _Source,
    store: ResultStore,
    states: dict[tuple[str, str], PairState],
    configs: dict[str, AttackConfig],
    norm: str,
    seed: int,
    device: torch.device,
    n_classes: int,
    progress: bool,
) -> None:
    """Attack every batch with every pair that has not reached it yet, saving as we go."""
    n = source.n
    bs = source.batch_size
    done_clean = len(store.clean)
    start = min([s.n_done for s in states.values()] + [done_clean])
    if n is not None:
        start = min(start, n)
    total = None
    if n is not None:
        total = sum(math.ceil(max(0, n - s.n_done) / bs) for s in states.values())
    bar = tqdm(total=total, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        for pos, x_raw, y_raw in source.batches(start):
            x, y = _prepare(x_raw, y_raw, device)
            if int(y.min()) < 0 or int(y.max()) >= n_classes:
                raise UserError(
                    f"labels must be in [0, {n_classes}) for this {n_classes}-class model; "
                    f"found {int(y.min())}..{int(y.max())} near sample {pos}"
                )
            end = pos + len(y)
            clean_ok = _predict(model, x) == y
            store.record_batch(pos, y.tolist(), clean_ok.int().tolist())
            for (name, lb), state in states.items():
                if state.n_done >= end:
                    continue
                if state.n_done < pos:  # pragma: no cover - start is the minimum
                    raise RuntimeError("resume state out of order")
                off = state.n_done - pos
                bar.set_postfix_str(f"{name} ε={lb}", refresh=False)
                t0 = time.perf_counter()
                cfg = configs[name]
                xs, ys, ok = x[off:], y[off:], clean_ok[off:]
                if cfg.components:
                    correct, excess, nonfinite, broken = _autoattack(
                        cfg, model, xs, ys, ok, state.eps, lb, norm, seed, pos + off, device
                    )
                    state.broken_by = (state.broken_by or []) + broken
                else:
                    s = derive_seed(seed, name, lb, pos + off)
                    correct, excess, nonfinite = _attack_subset(
                        cfg, model, xs, ys, ok, state.eps, norm, s, device
                    )
                state.correct += correct.int().tolist()
                state.max_excess = max(state.max_excess, excess)
                state.nonfinite += nonfinite
                state.seconds += time.perf_counter() - t0
                store.save_pair(state)
                bar.update(1)
            store.save_manifest()
    finally:
        bar.close()


def _autoattack(
    cfg: AttackConfig,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clean_ok: torch.Tensor,
    eps: float,
    label: str,
    norm: str,
    seed: int,
    pos: int,
    device: torch.device,
) -> tuple[torch.Tensor, float, int, list[str | None]]:
    """AutoAttack "standard": each component runs only on the samples all earlier ones missed.

    Per-sample worst case by construction: a sample is robust only if it survives every
    component. Each component uses the seed its standalone run would use, so the APGD-CE stage
    reproduces the standalone ``apgd-ce`` result exactly.
    """
    robust = clean_ok.clone()
    broken: list[str | None] = [None if ok else "clean" for ok in clean_ok.tolist()]
    excess, nonfinite = 0.0, 0
    for comp in cfg.components:
        if not robust.any():
            break
        s = derive_seed(seed, comp.name, label, pos)
        still, ex, nf = _attack_subset(comp, model, x, y, robust, eps, norm, s, device)
        for i in (robust & ~still).nonzero().flatten().tolist():
            broken[i] = comp.name
        robust = still
        excess, nonfinite = max(excess, ex), nonfinite + nf
    return robust, excess, nonfinite, broken


def _assemble(
    *,
    n: int,
    store: ResultStore,
    states: dict[tuple[str, str], PairState],
    names: list[str],
    eps_grid: list[float],
    norm: str,
    plan: Any,
    probe: dict,
    configs: dict[str, AttackConfig],
    config: dict,
) -> dict:
    """Turn per-sample states into the result dict (the content of eval.json)."""
    clean = store.clean[:n]
    labels = [eps_label(e, norm) for e in eps_grid]
    per_sample: dict[str, dict[str, list[int]]] = {}
    accuracy: dict[str, dict[str, float]] = {}
    perturbation: dict[str, dict[str, dict]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for (name, lb), st in states.items():
        if st.n_done < n:  # pragma: no cover - the loop covers every sample
            raise RuntimeError(f"{name} at ε={lb} covers {st.n_done} of {n} samples")
        per_sample.setdefault(name, {})[lb] = st.correct[:n]
        perturbation.setdefault(name, {})[lb] = {
            "max_excess": st.max_excess,
            "nonfinite": st.nonfinite,
        }
        seconds.setdefault(name, {})[lb] = round(st.seconds, 3)
    for name in names:
        accuracy[name] = {lb: sum(per_sample[name][lb]) / n for lb in labels}

    worst_ps = {
        lb: [int(all(per_sample[a][lb][i] for a in names)) for i in range(n)] for lb in labels
    }
    worst = {lb: sum(v) / n for lb, v in worst_ps.items()}

    autoattack = None
    broken_ps: dict[str, list] = {}
    square_breaks: dict[str, int] = {}
    if "autoattack" in names:
        autoattack = {}
        comps = [c.name for c in configs["autoattack"].components]
        for lb in labels:
            broken = (states[("autoattack", lb)].broken_by or [])[:n]
            broken_ps[lb] = broken
            remaining = sum(clean)
            after = {"clean": remaining / n}
            for c in comps:
                remaining -= sum(1 for b in broken if b == c)
                after[c] = remaining / n
            square_breaks[lb] = sum(1 for b in broken if b == "square")
            autoattack[lb] = {
                "accuracy": accuracy["autoattack"][lb],
                "robust_after": after,
                "broken_by": {c: sum(1 for b in broken if b == c) for c in comps},
            }

    sanity_result = None
    if plan is not None:
        counts = {k: sum(v.correct[:n]) for k, v in states.items()}
        pert = {k: (v.max_excess, v.nonfinite) for k, v in states.items()}
        sanity_result = run_sanity_checks(
            n=n,
            clean_count=sum(clean),
            counts=counts,
            selected=names,
            eps_grid=eps_grid,
            norm=norm,
            plan=plan,
            probe=probe,
            perturbation=pert,
            square_breaks=square_breaks,
            tolerance=config["tolerance"],
        )
        extra = {}
        for a, e in plan.pairs:
            lb = eps_label(e, norm)
            extra.setdefault(a, {})[lb] = sum(per_sample[a][lb]) / n
        sanity_result["accuracy"] = extra
        sanity_result["probe"] = probe

    intervals = _intervals(n, sum(clean), per_sample, worst_ps)
    config = dict(config)
    config["attack_configs"] = {a: configs[a].describe() for a in names}
    config["sanity_attack_configs"] = {
        a: c.describe() for a, c in configs.items() if a not in names
    }
    return {
        "format": RESULT_FORMAT,
        "n_samples": n,
        "norm": norm,
        "protocol": config["protocol"],
        "clean_accuracy": sum(clean) / n,
        "attacks": names,
        "eps": config["eps"],
        "accuracy": accuracy,
        "worst_case": worst,
        "intervals": intervals,
        "autoattack": autoattack,
        "sanity": sanity_result,
        "perturbation": perturbation,
        "seconds": seconds,
        "config": config,
        "per_sample": {
            "labels": store.labels[:n],
            "clean": clean,
            "attacks": per_sample,
            "worst_case": worst_ps,
            "autoattack_broken_by": broken_ps,
        },
    }


def _intervals(
    n: int,
    clean_count: int,
    per_sample: Mapping[str, Mapping[str, list[int]]],
    worst_ps: Mapping[str, list[int]],
) -> dict:
    """95 % Wilson intervals over the images for every accuracy the report prints."""
    return {
        "method": WILSON,
        "confidence": CONFIDENCE,
        "clean": list(wilson_interval(clean_count, n)),
        "accuracy": {
            name: {lb: list(wilson_interval(sum(v), n)) for lb, v in by_eps.items()}
            for name, by_eps in per_sample.items()
        },
        "worst_case": {lb: list(wilson_interval(sum(v), n)) for lb, v in worst_ps.items()},
    }
