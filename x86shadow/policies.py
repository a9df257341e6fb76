"""Emulate-or-unshadow policies (DESIGN.md 3). Placeholder registry until the policy issue lands."""
POLICY_NAMES = ["kvm", "kvm-2008", "kvm-2008-accessfix", "andrea", "xen", "emulate-all", "unshadow-all"]


def make_policy(name):
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}")
    return None
