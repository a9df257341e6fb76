"""The kmap scenario with several vCPUs (x86shadow scenario kmap --vcpus N): per-CPU kmap_atomic
slots (fixmap index type + KM_TYPE_NR * cpu, Linux 2.4/RHEL3 highmem.h kmap_atomic), each vCPU
scanning its share of the user tables; the host's figures against the guest's own counts."""
import pytest

from x86shadow import scenario as S


def _run(policy, vcpus, mode="pae"):
    kw = {} if vcpus is None else {"vcpus": vcpus}
    p = S.KmapParams(mode=mode, tables=4, ptes=16, scans=2, **kw).check()
    return S.run_kmap(p, policy, audit=True)


@pytest.mark.parametrize("mode", ["32", "pae"])
@pytest.mark.parametrize("policy", ["kvm-2008", "kvm", "xen"])
def test_each_vcpu_kmaps_its_share_through_its_own_slot(policy, mode):
    r = _run(policy, 2, mode)
    a, b = r["per_vcpu"]
    assert r["vcpus"] == 2
    assert a["kpte_gpa"] != b["kpte_gpa"] and a["kmap_vaddr"] != b["kmap_vaddr"]
    assert a["tables"] + b["tables"] == 4 and a["first_table"] != b["first_table"]
    assert a["kmaps"] + b["kmaps"] == r["kmaps"] == 4 * 16 * 2
    assert a["fixmap_writes"] + b["fixmap_writes"] == r["fixmap_writes"]
    # every emulated fixmap store went to the storing vCPU's own slot pte
    assert a["other_fixmap_writes_emulated"] == b["other_fixmap_writes_emulated"] == 0
    assert a["slot_writes_emulated"] + b["slot_writes_emulated"] == r["fixmap_writes_emulated"]
    if policy == "kvm-2008":                   # emulates every fixmap store (no unsync)
        assert r["fixmap_writes_emulated"] == r["fixmap_writes"]


def test_bad_vcpus_are_usage_errors():
    with pytest.raises(S.ScenarioError):
        S.KmapParams(tables=4, ptes=16, vcpus=9).check()
    with pytest.raises(S.ScenarioError):
        S.KmapParams(tables=2, ptes=16, vcpus=3).check()


def test_one_vcpu_is_the_scenario_as_before():
    one = _run("kvm-2008", None)
    also = _run("kvm-2008", 1)
    for k in ("kmaps", "fixmap_writes", "fixmap_writes_emulated", "emulated_writes"):
        assert one[k] == also[k]
    assert one["counters"]["exits"] == also["counters"]["exits"]


def test_slices_cut_at_exits_do_not_store_twice():
    """--schedule ...:exits must not cut a slice inside a trapped page-table store (the store
    would go through and the instruction run again: vm_scheduler.py)."""
    p = S.KmapParams(tables=4, ptes=16, scans=2, vcpus=2, schedule="rr:50:exits").check()
    r = S.run_kmap(p, "kvm-2008", audit=True)
    for v in r["per_vcpu"]:
        assert v["btrs"] == v["kmaps"] and v["kunmaps"] == v["kmaps"]
    assert r["fixmap_writes_emulated"] == r["fixmap_writes"]
