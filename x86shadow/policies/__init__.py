"""Emulate-or-unshadow policies (docs/POLICY_SOURCES.md): the user picks one with ``--policy``."""
from __future__ import annotations

from .base import AHEAD, EMULATE, FAIL, UNPROTECT, Policy, Verdict
from .baselines import EmulateAll, UnshadowAll
from .kvm import Kvm
from .kvm2008 import Andrea, Kvm2008, Kvm2008AccessFix
from .xen import Xen

POLICIES = {cls.name: cls for cls in (Kvm, Kvm2008, Kvm2008AccessFix, Andrea, Xen, EmulateAll,
                                      UnshadowAll)}
POLICY_NAMES = list(POLICIES)
DEFAULT_POLICY = "kvm"


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})") from None


__all__ = ["AHEAD", "EMULATE", "FAIL", "UNPROTECT", "Policy", "Verdict", "POLICIES", "POLICY_NAMES",
           "DEFAULT_POLICY", "make_policy"]
