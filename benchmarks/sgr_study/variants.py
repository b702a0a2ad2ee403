"""What the study trains: a ``Variant`` (method, K and penalty settings) times a seed, and the
two profiles (CPU-sized and paper-scale)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Variant:
    """One configuration before the seed.

    method: "bp" (global backprop), "local" (lam = 0) or "sgr".
    distance / lam_mode / lam: ``LocalNet``'s arguments (lam_mode "fixed": lam weighs R_k;
    "grad_ratio": lam is the penalty gradient's norm over the loss gradient's, per block).
    schedule: "const"; "warm" (lam ramps up linearly over the first third of training);
    "late" (off for the first half, then on).
    side: "input" (the penalty trains block k, DESIGN.md), "output" (it trains block k-1) or
    "handback" (control: block k-1 also descends lam x block k's loss through one boundary).
    """

    method: str
    K: int = 1
    distance: str = "l2"
    lam_mode: str = "fixed"
    lam: float = 0.0
    schedule: str = "const"
    side: str = "input"

    @property
    def name(self) -> str:
        if self.method == "bp":
            return "bp"
        if self.method == "local":
            return f"K{self.K}-local"
        mode = "ratio" if self.lam_mode == "grad_ratio" else "fixed"
        sched = "" if self.schedule == "const" else f"-{self.schedule}"
        method = {"input": "sgr", "output": "sgrout", "handback": "handback"}[self.side]
        return f"K{self.K}-{method}-{self.distance}-{mode}{self.lam:g}{sched}"

    @property
    def family(self) -> str:
        """The name without K: the same setting at another K."""
        return self.name.split("-", 1)[1] if self.method != "bp" else "bp"

    def at(self, K: int) -> "Variant":
        return Variant(self.method, K, self.distance, self.lam_mode, self.lam, self.schedule, self.side)

    def cost(self) -> float:
        """Relative time per step, for longest-first scheduling."""
        base = {"bp": 1.0, "local": 1.6}.get(self.method, 5.0 if self.side == "input" else 6.0)
        return base * (1.0 + self.K / 16)

    def as_dict(self) -> dict:
        return asdict(self)


def sgr(K, distance, lam_mode, lam, schedule="const", side="input") -> Variant:
    return Variant("sgr", K, distance, lam_mode, lam, schedule, side)


def screen_variants(K: int, broad: bool, tiny: bool = False) -> list[Variant]:
    """Every penalty setting screened at one seed (``broad``: the full list, else a subset;
    ``tiny``: one setting per side, for the CI smoke run)."""
    if tiny:
        return [sgr(K, "l2", "grad_ratio", 0.1), sgr(K, "l2", "grad_ratio", 0.1, side="output")]
    vs = [
        sgr(K, "l2", "fixed", 1.0),  # the definition as shipped, strong enough to act
        sgr(K, "l2", "grad_ratio", 0.1),
        sgr(K, "l2", "grad_ratio", 0.3),
        sgr(K, "cosine", "grad_ratio", 0.1),
        sgr(K, "l2", "grad_ratio", 0.1, side="output"),
        sgr(K, "l2", "grad_ratio", 0.3, side="output"),
        sgr(K, "l2", "grad_ratio", 0.3, side="handback"),
        sgr(K, "l2", "grad_ratio", 1.0, side="handback"),
    ]
    if broad:
        vs += [
            sgr(K, "l2_rel", "fixed", 0.3),
            sgr(K, "l2", "grad_ratio", 0.03),
            sgr(K, "l2", "grad_ratio", 1.0),
            sgr(K, "l2", "grad_ratio", 0.3, "warm"),
            sgr(K, "l2", "grad_ratio", 0.3, "late"),
            sgr(K, "cosine", "grad_ratio", 0.3, side="output"),
            sgr(K, "l2", "grad_ratio", 1.0, side="output"),
            sgr(K, "l2", "grad_ratio", 0.03, side="output"),
            sgr(K, "l2", "grad_ratio", 0.1, side="handback"),
        ]
    return vs


@dataclass(frozen=True)
class Profile:
    archs: tuple
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    screen_K: int  # K screened broadly
    other_K: tuple  # Ks that get local + the best few of the screen
    seeds: tuple = (0, 1, 2)
    val_fraction: float = 0.1
    top_other: int = 3  # screen-best variants tried at the other Ks
    top_confirm: int = 2  # best variants per (arch, K) confirmed at every seed
    mode: str = "exact"
    tiny: bool = False  # smoke: one setting per side
    train_limit: int | None = None  # smoke: the first N training images only


PROFILES = {
    # 2 CPU cores: 16x16 inputs (2x2 area-downsampled CIFAR), 8-unit networks
    # ("fast" engine: the same objective as "exact" within ~1e-3 of the penalty gradient, 1.5x faster)
    "cpu": Profile(archs=("cnn", "rescnn"), image_size=16, epochs=10, batch_size=128, lr=0.1,
                   screen_K=8, other_K=(4,), mode="fast", top_other=2, top_confirm=1),
    # one GPU: the paper's setting
    "gpu": Profile(archs=("resnet32", "resnet110"), image_size=32, epochs=60, batch_size=128, lr=0.1,
                   screen_K=16, other_K=(8,)),
    # CI smoke: seconds
    "smoke": Profile(archs=("cnn",), image_size=8, epochs=1, batch_size=32, lr=0.05,
                     screen_K=4, other_K=(2,), seeds=(0, 1), top_other=1, top_confirm=1, tiny=True, train_limit=256),
}
