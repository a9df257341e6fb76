"""Guest exceptions as the MMU core and the CPU adapter raise them: vectors, names, the
exception a guest access raises (``Fault``) and the end of a guest that cannot go on
(``GuestCrash``)."""
from __future__ import annotations

VEC_DE, VEC_DB, VEC_NMI, VEC_BP, VEC_OF, VEC_BR, VEC_UD, VEC_NM, VEC_DF = range(9)
VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF = 10, 11, 12, 13, 14
VEC_AC = 17
HAS_ERROR_CODE = {VEC_DF, VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF, VEC_AC}
CONTRIBUTORY = {VEC_DE, VEC_TS, VEC_NP, VEC_SS, VEC_GP}
NAMES = {0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
         5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available",
         8: "#DF double fault", 10: "#TS invalid TSS", 11: "#NP segment not present",
         12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
         16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check", 19: "#XM SIMD"}


class Fault(Exception):
    """An exception raised while delivering another one (or by the memory accessors)."""

    def __init__(self, vector, error_code=None, cr2=None):
        super().__init__(vector)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class GuestCrash(Exception):
    """The guest cannot go on: unhandled exception (firmware IDT), triple fault, ..."""

    def __init__(self, reason, vector=None, error_code=None, rip=None, cr2=None, shutdown=False):
        super().__init__(reason)
        self.reason, self.vector, self.error_code, self.rip, self.cr2 = reason, vector, error_code, rip, cr2
        self.shutdown = shutdown        # a triple fault (the CPU shuts down)


def vector_name(v):
    return NAMES.get(v, f"vector {v}")
