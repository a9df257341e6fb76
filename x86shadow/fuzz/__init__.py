"""Differential fuzzing of the shadow MMU against Unicorn's own MMU (``--mmu native``).

``ptprog``: random self-checking page-table programs; ``differential``: run one program under
the native MMU and under the shadow MMU with every policy (audit on) and report the first
difference.
"""
