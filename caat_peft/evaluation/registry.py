"""Attack names → torchattacks classes with the exact parameters used, plus ε parsing.

Every attack the suite runs is described by an :class:`AttackConfig` (class name, constructor
arguments, attributes patched after construction). The description goes into ``eval.json`` and
into the resume fingerprint, so a reader can see exactly what "apgd-t" meant and a changed
budget never silently reuses old per-sample results.

We do not use ``torchattacks.AutoAttack``: in torchattacks 3.5.1 its "standard" version builds
APGD / APGD-T / FAB with the class default of 10 steps (the protocol uses 100) and sets
``n_classes - 1`` target classes (the protocol uses 9; with 200 classes that is 199 targeted
runs of 10 steps instead of 9 of 100 — a weaker attack at about twice the cost). ``autoattack``
here is assembled from the same torchattacks components with the standard settings; see
``docs/evaluation.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torchattacks

from caat_peft.errors import UserError

NORMS = ("linf", "l2")
_TA_NORM = {"linf": "Linf", "l2": "L2"}

#: The paper's Table 1 grid (L∞, pixel space).
DEFAULT_LINF_EPS: tuple[float, ...] = (8 / 255, 16 / 255, 24 / 255, 32 / 255)
#: L2 default: RobustBench's CIFAR L2 budget (0.5) and twice it. RobustBench's ImageNet board is
#: L∞ only; the L2 robust-ImageNet literature uses 3.0 at 224 px — pass it explicitly.
DEFAULT_L2_EPS: tuple[float, ...] = (0.5, 1.0)
DEFAULT_EPS: dict[str, tuple[float, ...]] = {"linf": DEFAULT_LINF_EPS, "l2": DEFAULT_L2_EPS}

#: Default selection: the paper's Table 1 columns except untargeted FAB (its cost grows with the
#: number of classes — one backward pass per class per step, 200 on CUB) plus AutoAttack.
DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {
    "linf": ("fgsm", "pgd20", "apgd-ce", "mifgsm", "fab-t", "autoattack"),
    "l2": ("fgm-l2", "pgd-l2", "apgd-l2", "fab-t", "autoattack"),
}
#: Named selections accepted wherever a list of attack names is.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "default": DEFAULT_ATTACKS,
    "paper": {  # Table 1 columns in the paper's order
        "linf": ("pgd20", "apgd-ce", "mifgsm", "fab", "fab-t", "fgsm"),
        "l2": ("pgd-l2", "apgd-l2", "fab", "fab-t", "fgm-l2"),
    },
    "all": {
        "linf": (
            "fgsm",
            "pgd20",
            "pgd50",
            "mifgsm",
            "apgd-ce",
            "apgd-dlr",
            "apgd-t",
            "fab",
            "fab-t",
            "square",
            "autoattack",
        ),
        "l2": (
            "fgm-l2",
            "pgd-l2",
            "apgd-l2",
            "apgd-dlr",
            "apgd-t",
            "fab",
            "fab-t",
            "square",
            "autoattack",
        ),
    },
}

#: The fixed attack names (``pgdN`` / ``pgdN-l2`` for any N are accepted too).
ATTACK_NAMES: tuple[str, ...] = (
    "fgsm",
    "pgd20",
    "pgd50",
    "mifgsm",
    "apgd-ce",
    "apgd-dlr",
    "apgd-t",
    "fab",
    "fab-t",
    "square",
    "autoattack",
    "pgd-l2",
    "apgd-l2",
    "fgm-l2",
    "noise",
)
_ALIASES = {
    "aa": "autoattack",
    "apgd": "apgd-ce",
    "autopgd": "apgd-ce",
    "apgd-ce-l2": "apgd-l2",
    "t-apgd": "apgd-t",
    "t-fab": "fab-t",
    "pgd20-l2": "pgd-l2",
}
_LINF_ONLY = {"fgsm", "mifgsm"}
_L2_ONLY = {"pgd-l2", "apgd-l2", "fgm-l2"}
#: AutoAttack "standard": the components in the order they run.
AUTOATTACK_COMPONENTS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
_PGD_RE = re.compile(r"^pgd(\d+)(-l2)?$")
#: Sanity-only attacks (not selectable by users): PGD without its random start, for the
#: unbounded-ε check. At ε = 1 a random start alone is a random image, which a many-class model
#: misclassifies whether or not its gradients are useful; from the clean input only the
#: gradient can move the image. Distinct names keep their resume files apart from ``pgd20``'s.
NO_RANDOM_START: dict[str, str] = {"pgd20-nrs": "pgd20", "pgd-l2-nrs": "pgd-l2"}


@dataclass(frozen=True)
class AttackBudget:
    """Iteration / query / target counts. The defaults *are* the standard AutoAttack protocol.

    Scale them down only for smoke tests or quick looks: a report made with any other value is
    labelled "reduced" and is not comparable with RobustBench figures.
    """

    apgd_steps: int = 100
    apgd_restarts: int = 1
    fab_steps: int = 100
    fab_restarts: int = 1
    square_queries: int = 5000
    n_targets: int = 9
    mifgsm_steps: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"attack budget {f.name}={value!r} must be an integer ≥ 1")

    @property
    def is_standard(self) -> bool:
        return self == AttackBudget()


BUDGETS: dict[str, AttackBudget] = {
    "standard": AttackBudget(),
    "fast": AttackBudget(apgd_steps=25, fab_steps=25, square_queries=1000, n_targets=3),
}


def resolve_budget(budget: str | AttackBudget | Mapping[str, int] | None) -> AttackBudget:
    """A budget from a preset name, a mapping of overrides on top of "standard", or itself."""
    if budget is None:
        return AttackBudget()
    if isinstance(budget, AttackBudget):
        return budget
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise UserError(f"unknown attack budget {budget!r}; use one of {', '.join(BUDGETS)}")
        return BUDGETS[budget]
    if isinstance(budget, Mapping):
        known = {f.name for f in fields(AttackBudget)}
        unknown = sorted(set(budget) - known)
        if unknown:
            raise UserError(
                f"unknown attack budget field(s) {', '.join(unknown)}; use {', '.join(sorted(known))}"
            )
        return replace(AttackBudget(), **budget)
    raise UserError(f"attack budget {budget!r} must be 'standard', 'fast' or an AttackBudget")


def check_norm(norm: str) -> str:
    """Normalise the norm name ("Linf", "inf", "L2" are accepted)."""
    key = str(norm).lower().replace("∞", "inf")
    key = {"inf": "linf", "l_inf": "linf", "2": "l2"}.get(key, key)
    if key not in NORMS:
        raise UserError(f"norm {norm!r} is not supported; use 'linf' or 'l2'")
    return key


# --------------------------------------------------------------------------------------------
# ε values


def parse_eps(value: str | float | int) -> float:
    """One ε from a number or a fraction string such as ``"8/255"`` (the CLI writes them so)."""
    if isinstance(value, bool):
        raise UserError(f"ε {value!r} is not a number; write it like 8/255 or 0.031")
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"ε {value!r} is not a number; write it like 8/255 or 0.031") from None
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"ε {value!r} must be a finite number ≥ 0; write it like 8/255 or 0.031")
    return eps


def parse_eps_list(
    values: str | float | Iterable[str | float] | None, norm: str = "linf"
) -> list[float]:
    """The ε grid, ascending and without duplicates; None gives the norm's default grid.

    Accepts a comma-separated string (``"8/255,16/255"``) for the CLI. L∞ ε above 1 is rejected
    (pixels live in [0, 1], so ε = 1 already allows any image).
    """
    norm = check_norm(norm)
    if values is None:
        return list(DEFAULT_EPS[norm])
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    elif isinstance(values, (int, float)):
        values = [values]
    eps_values = [parse_eps(v) for v in values]
    if not eps_values:
        raise UserError("the ε list is empty; give at least one value such as 8/255")
    if norm == "linf":
        too_big = [e for e in eps_values if e > 1.0]
        if too_big:
            raise UserError(
                f"L∞ ε {too_big[0]:g} is above 1 (pixels are in [0, 1]); write ε in pixel "
                "units such as 8/255"
            )
    if norm == "linf":  # 0.0313725 written by hand means 8/255: use the exact value
        eps_values = [_snap_255(e) for e in eps_values]
    out: list[float] = []
    for eps in sorted(eps_values):
        if not any(eps_label(eps, norm) == eps_label(o, norm) for o in out):
            out.append(eps)
    return out


def _snap_255(eps: float) -> float:
    """k/255 exactly when ``eps`` is within rounding of it (pixel ε is usually written so)."""
    k = round(eps * 255)
    return k / 255 if abs(eps * 255 - k) < 1e-4 else eps


def eps_label(eps: float, norm: str = "linf") -> str:
    """Human and JSON-key form: ``"8/255"`` for L∞ multiples of 1/255, else ``"%g"``."""
    if norm == "linf":
        k = round(eps * 255)
        if abs(eps * 255 - k) < 1e-4:
            return "0" if k == 0 else f"{k}/255"
    return f"{eps:.6g}"


# --------------------------------------------------------------------------------------------
# attack configurations


@dataclass(frozen=True)
class AttackConfig:
    """How one named attack is built: the torchattacks class and its exact arguments.

    ``eps_scaled`` arguments are multiplied by ε at build time (step sizes are relative to ε so
    that one configuration serves the whole grid).
    """

    name: str
    kind: str  # "white-box", "black-box", "noise" or "ensemble"
    cls: str
    kwargs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    eps_scaled: dict = field(default_factory=dict)
    components: tuple[AttackConfig, ...] = ()

    def describe(self) -> dict:
        """A JSON-able description (goes into eval.json and the resume fingerprint)."""
        out = asdict(self)
        out["components"] = [c.describe() for c in self.components]
        if not out["components"]:
            del out["components"]
        return out


def canonical_name(name: str) -> str:
    """Lower-case, aliases resolved, ``pgd20-l2`` spelled ``pgd-l2``; UserError if unknown."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    m = _PGD_RE.match(key)
    if m:
        steps = int(m.group(1))
        if steps < 1:
            raise UserError(f"attack {name!r} needs at least 1 step; use e.g. pgd20")
        if m.group(2):
            return "pgd-l2" if steps == 20 else f"pgd{steps}-l2"
        return key
    if key not in ATTACK_NAMES:
        raise UserError(
            f"unknown attack {name!r}; choose from {', '.join(ATTACK_NAMES)} (or pgdN / pgdN-l2), "
            f"or a preset: {', '.join(PRESETS)}"
        )
    return key


def _name_norm(name: str) -> str | None:
    """The only norm this attack supports, or None when it supports both."""
    m = _PGD_RE.match(name)
    if name in _L2_ONLY or (m and m.group(2)):
        return "l2"
    if name in _LINF_ONLY or m:
        return "linf"
    return None


def resolve_attack_names(attacks: str | Sequence[str] | None, norm: str = "linf") -> list[str]:
    """Canonical, de-duplicated attack names for ``norm``; presets expand in place.

    A comma-separated string is accepted for the CLI. Raises UserError for unknown names and for
    attacks that do not exist in this norm (e.g. ``fgsm`` with L2).
    """
    norm = check_norm(norm)
    if attacks is None:
        attacks = ["default"]
    elif isinstance(attacks, str):
        attacks = [a for a in attacks.split(",") if a.strip()]
    out: list[str] = []
    for raw in attacks:
        key = str(raw).strip().lower()
        expanded = list(PRESETS[key][norm]) if key in PRESETS else [canonical_name(raw)]
        for name in expanded:
            only = _name_norm(name)
            if only is not None and only != norm:
                hint = "pgd-l2, apgd-l2 or fgm-l2" if norm == "l2" else "pgd20, apgd-ce or fgsm"
                raise UserError(
                    f"attack {name!r} is {'L2' if only == 'l2' else 'L∞'}-only but norm={norm!r}; "
                    f"use {hint}, or norm={only!r}"
                )
            if name not in out:
                out.append(name)
    if not out:
        raise UserError("no attack selected; name at least one, e.g. pgd20 or autoattack")
    return out


def attack_kind(name: str) -> str:
    """ "white-box", "black-box", "noise" or "ensemble" (used by the sanity checks)."""
    if name == "square":
        return "black-box"
    if name == "noise":
        return "noise"
    if name == "autoattack":
        return "ensemble"
    return "white-box"


def pgd_steps(name: str) -> int | None:
    """Number of steps of a PGD-family name (``fgsm``/``fgm-l2`` count as 1), else None."""
    if name in ("fgsm", "fgm-l2"):
        return 1
    if name == "pgd-l2":
        return 20
    m = _PGD_RE.match(name)
    return int(m.group(1)) if m else None


def _step_fraction(steps: int) -> float:
    # ε/4 per step (2/255 at 8/255, the usual PGD-20 setting), but never a total path shorter
    # than 2.5 ε (Madry et al.'s rule), which matters for very few steps.
    return max(0.25, 2.5 / steps)


def n_targets(budget: AttackBudget, n_classes: int) -> int:
    """Target classes for APGD-T / FAB-T: min(9, n_classes − 1) under the standard budget."""
    return max(1, min(budget.n_targets, n_classes - 1))


_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "autoattack": 4, "fab": 2, "fab-t": 2}


def attack_config(name: str, norm: str, budget: AttackBudget, n_classes: int) -> AttackConfig:
    """The configuration of one canonical attack name for ``norm`` and a model's class count."""
    norm = check_norm(norm)
    tnorm = _TA_NORM[norm]
    need = _MIN_CLASSES.get(name, 2)
    if n_classes < need:
        raise UserError(
            f"attack {name!r} needs a model with at least {need} classes (the DLR losses compare "
            f"the top logits) but this one has {n_classes}; drop {name!r} from the attack list"
        )
    targets = n_targets(budget, n_classes)
    if name in NO_RANDOM_START:
        base = attack_config(NO_RANDOM_START[name], norm, budget, n_classes)
        return replace(base, name=name, kwargs={**base.kwargs, "random_start": False})
    steps = pgd_steps(name)
    if name == "fgsm":
        return AttackConfig(name, "white-box", "FGSM")
    if name == "fgm-l2":
        return AttackConfig(
            name,
            "white-box",
            "PGDL2",
            {"steps": 1, "random_start": False},
            eps_scaled={"alpha": 1.0},
        )
    if steps is not None:  # pgdN, pgd-l2, pgdN-l2
        cls = "PGDL2" if norm == "l2" else "PGD"
        return AttackConfig(
            name,
            "white-box",
            cls,
            {"steps": steps, "random_start": True},
            eps_scaled={"alpha": _step_fraction(steps)},
        )
    if name == "mifgsm":
        return AttackConfig(
            name,
            "white-box",
            "MIFGSM",
            {"steps": budget.mifgsm_steps, "decay": 1.0},
            eps_scaled={"alpha": _step_fraction(budget.mifgsm_steps)},
        )
    if name in ("apgd-ce", "apgd-l2", "apgd-dlr"):
        loss = "dlr" if name == "apgd-dlr" else "ce"
        kw = {"norm": tnorm, "steps": budget.apgd_steps, "n_restarts": budget.apgd_restarts}
        kw.update({"loss": loss, "eot_iter": 1, "rho": 0.75})
        return AttackConfig(name, "white-box", "APGD", kw)
    if name == "apgd-t":
        kw = {"norm": tnorm, "steps": budget.apgd_steps, "n_restarts": 1, "eot_iter": 1}
        kw.update({"rho": 0.75, "n_classes": n_classes})
        # APGDT's constructor sets n_target_classes = n_classes - 1; the protocol wants 9.
        return AttackConfig(name, "white-box", "APGDT", kw, attrs={"n_target_classes": targets})
    if name in ("fab", "fab-t"):
        targeted = name == "fab-t"
        kw = {
            "norm": tnorm,
            "steps": budget.fab_steps,
            "n_restarts": 1 if targeted else budget.fab_restarts,
            "alpha_max": 0.1,
            "eta": 1.05,
            "beta": 0.9,
            "multi_targeted": targeted,
            "n_classes": n_classes,
        }
        attrs = {"n_target_classes": targets} if targeted else {}
        return AttackConfig(name, "white-box", "FAB", kw, attrs=attrs)
    if name == "square":
        kw = {
            "norm": tnorm,
            "n_queries": budget.square_queries,
            "n_restarts": 1,
            "p_init": 0.8,
            "loss": "margin",
            # The reference AutoAttack runs 5000 queries with the schedule as written
            # (resc_schedule=False); a reduced budget needs the schedule compressed to fit.
            "resc_schedule": budget.square_queries != 5000,
        }
        return AttackConfig(name, "black-box", "Square", kw)
    if name == "noise":
        return AttackConfig(name, "noise", "noise", {"norm": norm})
    if name == "autoattack":
        comps = tuple(attack_config(c, norm, budget, n_classes) for c in AUTOATTACK_COMPONENTS)
        return AttackConfig(name, "ensemble", "AutoAttack(standard, assembled)", components=comps)
    raise UserError(f"attack {name!r} is not available for norm {norm!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# building


class RandomNoise:
    """Random perturbation on the ε-sphere: a sanity baseline that any real attack must beat.

    L∞: every pixel moved by ±ε (a random corner of the ε-box, the largest noise allowed);
    L2: a Gaussian direction scaled to norm ε. Drawn from torch's global RNG (seeded by the caller).
    """

    def __init__(self, eps: float, norm: str) -> None:
        self.eps = float(eps)
        self.norm = check_norm(norm)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn(images.shape).to(images.device, images.dtype)
        if self.norm == "linf":
            delta = self.eps * noise.sign()
        else:
            flat = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = noise * (self.eps / flat).view(-1, *([1] * (images.dim() - 1)))
        return (images + delta).clamp(0.0, 1.0)


def _identity(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    return images.clone()


def make_attack(
    config: AttackConfig,
    model: torch.nn.Module,
    eps: float,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Instantiate a single (non-ensemble) attack: ``attack(images, labels) -> adv_images``.

    The caller seeds torch's RNG too: PGD / MIFGSM / noise draw from the global RNG, while APGD /
    FAB / Square re-seed it from ``seed`` themselves.
    """
    if config.components:
        raise ValueError("make_attack builds single attacks; autoattack runs via the suite")
    if eps == 0:
        # The ε-ball is {x}. torchattacks' PGDL2 computes ε / ‖δ‖ = 0 / 0 there and returns NaN.
        return _identity
    if config.cls == "noise":
        return RandomNoise(eps, config.kwargs["norm"])
    cls = getattr(torchattacks, config.cls)
    kwargs = dict(config.kwargs)
    kwargs.update({k: v * eps for k, v in config.eps_scaled.items()})
    kwargs["eps"] = eps
    if config.cls in ("APGD", "APGDT", "FAB", "Square"):
        kwargs["seed"] = seed
    atk = cls(model, **kwargs)
    for key, value in config.attrs.items():
        setattr(atk, key, value)
    if device is not None:
        # torchattacks takes the device from the first parameter; a parameter-free model (or one
        # split over devices) needs it set explicitly.
        atk.set_device(torch.device(device))
    return atk
