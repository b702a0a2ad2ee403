"""Which runs the study needs next, from the runs already finished (so a study can be stopped,
resumed and extended: finished runs are cached by configuration and never rerun).

Stages, each chosen on VALIDATION accuracy only:
1. screen, seed 0: at ``screen_K``, bp, plain local and every penalty setting on the first
   architecture, the shorter list on the others;
2. the other Ks, seed 0: plain local and the ``top_other`` best settings of stage 1 (per arch);
3. confirm: for every (arch, K), plain local, bp and the ``top_confirm`` best settings of
   that cell, at every seed.
"""
from __future__ import annotations

from .variants import Variant, screen_variants


def _val(results: dict, arch: str, v: Variant, seed: int = 0):
    r = results.get((arch, v.name, seed))
    return None if r is None else r["val_acc"]


def best(results: dict, arch: str, candidates: list[Variant], n: int, seed: int = 0) -> list[Variant]:
    """The ``n`` candidates with the highest validation accuracy at ``seed`` (finished ones only)."""
    scored = [(v, _val(results, arch, v, seed)) for v in candidates]
    scored = [(v, s) for v, s in scored if s is not None]
    scored.sort(key=lambda vs: -vs[1])
    return [v for v, _ in scored[:n]]


def stage_jobs(profile, results: dict) -> list[list[tuple[str, Variant, int]]]:
    """The three stages' (arch, variant, seed) jobs given the finished ``results``
    ({(arch, name, seed): record}); a stage is complete when all its jobs are in ``results``."""
    K0 = profile.screen_K
    s1, s2, s3 = [], [], []
    for i, arch in enumerate(profile.archs):
        screen = screen_variants(K0, broad=i == 0, tiny=profile.tiny)
        s1 += [(arch, Variant("bp"), 0), (arch, Variant("local", K0), 0)] + [(arch, v, 0) for v in screen]
        top = best(results, arch, screen, profile.top_other)
        for K in profile.other_K:
            s2 += [(arch, Variant("local", K), 0)] + [(arch, v.at(K), 0) for v in top]
        for K in (K0, *profile.other_K):
            cands = screen if K == K0 else [v.at(K) for v in top]
            chosen = best(results, arch, cands, profile.top_confirm)
            for seed in profile.seeds:
                s3 += [(arch, Variant("bp"), seed), (arch, Variant("local", K), seed)] + [(arch, v, seed) for v in chosen]
    return [_unique(s1), _unique(s2), _unique(s3)]


def _unique(jobs: list) -> list:
    seen, out = set(), []
    for arch, v, seed in jobs:
        key = (arch, v.name, seed)
        if key not in seen:
            seen.add(key)
            out.append((arch, v, seed))
    return out
