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


UNSYNC_POLICIES = ("kvm",)        # the policies with out-of-sync pages to turn on or off


def make_policy(name: str, unsync: bool | None = None) -> Policy:
    """The policy called name. ``unsync``: out-of-sync pages on or off (``--unsync``; None: the
    policy's default -- on where it has them)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})") from None
    if name in UNSYNC_POLICIES:
        return cls() if unsync is None else cls(unsync=unsync)
    if unsync:
        raise ValueError(f"policy {name!r} has no out-of-sync pages (--unsync on is for "
                         f"{', '.join(UNSYNC_POLICIES)})")
    return cls()


__all__ = ["AHEAD", "EMULATE", "FAIL", "UNPROTECT", "Policy", "Verdict", "POLICIES", "POLICY_NAMES",
           "DEFAULT_POLICY", "UNSYNC_POLICIES", "make_policy"]
