"""Emulate-or-unshadow policies (docs/POLICY_SOURCES.md): the user picks one with ``--policy``."""
from __future__ import annotations

from .base import AHEAD, EMULATE, FAIL, UNPROTECT, Policy, Verdict
from .baselines import EmulateAll, UnshadowAll
from .kvm import Kvm
from .kvm2008 import Andrea, Kvm2008, Kvm2008AccessFix, Kvm2008Oos
from .xen import Xen, XenOos

POLICIES = {cls.name: cls for cls in (Kvm, Kvm2008, Kvm2008AccessFix, Kvm2008Oos, Andrea, Xen,
                                      XenOos, EmulateAll, UnshadowAll)}
POLICY_NAMES = list(POLICIES)
DEFAULT_POLICY = "kvm"


# the policies whose out-of-sync pages ``--unsync`` turns on or off (KVM's oos_shadow module
# parameter, 2.6.28-3.x); xen-oos always has them (Xen 3.3 builds them in: SHOPT_OUT_OF_SYNC),
# and without them it is policy xen
UNSYNC_POLICIES = ("kvm", "kvm-2008-oos")
OOS_ALWAYS = {"xen-oos": "xen"}


def make_policy(name: str, unsync: bool | None = None) -> Policy:
    """The policy called name. ``unsync``: out-of-sync pages on or off (``--unsync``; None: the
    policy's default -- on where it has them)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICY_NAMES)})") from None
    if name in UNSYNC_POLICIES:
        return cls() if unsync is None else cls(unsync=unsync)
    if name in OOS_ALWAYS:
        if unsync is False:
            raise ValueError(f"policy {name!r} always has out-of-sync pages (without them it is "
                             f"policy {OOS_ALWAYS[name]!r})")
        return cls()
    if unsync:
        raise ValueError(f"policy {name!r} has no out-of-sync pages (--unsync on is for "
                         f"{', '.join(UNSYNC_POLICIES + tuple(OOS_ALWAYS))})")
    return cls()


# ------------------------------------------------------------------ configurations compared
UNSYNC_OFF = " --unsync off"


def config_label(name: str, unsync_on: bool) -> str:
    """The name of a (policy, out-of-sync pages) configuration in comparisons: the policy, with
    " --unsync off" where it can turn them off and they are off."""
    return name if unsync_on or name not in UNSYNC_POLICIES else name + UNSYNC_OFF


def comparison_configs(unsync: bool | None = None) -> list:
    """What comparisons run (``scenario kmap --compare``, the differential fuzzer): every policy
    as it comes and -- unless ``unsync`` decides for all -- kvm with out-of-sync pages off right
    after kvm (KVM's oos_shadow=0), as (name, unsync) pairs for make_policy."""
    out = []
    for name in POLICY_NAMES:
        out.append((name, unsync if name in UNSYNC_POLICIES else None))
        if name == "kvm" and unsync is None:
            out.append((name, False))
    return out


def policy_of_label(label: str) -> Policy:
    """The policy a config_label names."""
    if label.endswith(UNSYNC_OFF):
        return make_policy(label[:-len(UNSYNC_OFF)], False)
    return make_policy(label)


__all__ = ["AHEAD", "EMULATE", "FAIL", "UNPROTECT", "Policy", "Verdict", "POLICIES", "POLICY_NAMES",
           "DEFAULT_POLICY", "UNSYNC_POLICIES", "OOS_ALWAYS", "make_policy", "config_label",
           "comparison_configs", "policy_of_label"]
