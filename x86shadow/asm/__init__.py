"""Keystone front end: the only way guest code (firmware and programs) is assembled.

What this package adds on top of keystone 0.9.2 (docs/ARCHITECTURE.md, "Guest program contract"):

* ``.include "file"`` (relative to the including file, nested, cycle guard), predefined symbols
  (``.set NAME, value`` lines in front of the source; line numbers are kept), ``.error "text"``.
* Errors that name the file and line: ``prog.asm:12: invalid mnemonic 'foo eax'``. Keystone reports
  neither line nor symbol name: a failed assembly is diagnosed by bisecting over line prefixes
  (open blocks closed, symbols defined by later lines stubbed as labels) and undefined symbols are
  named. Users never see a ``KsError``, a traceback, a hang or a crash: everything is an
  :class:`AsmError`. Errors found by the preprocessor in a statement are deferred to that statement
  (reported only if keystone assembles it), so ``.if BITS == 64`` branches may hold 64-bit code.
* Keystone's mis-encodings are rewritten or rejected (each checked in tests/test_asm.py):

  - 32-bit ``lgdt/lidt/sgdt/sidt`` carry a bogus 0x66 prefix (24-bit base)   -> correct bytes
  - 32-bit ``ljmp SEL:OFF`` is a 16-bit far jump (66 EA ptr16:16)             -> EA ptr16:32
  - ``iret`` is the 16-bit ``iretw`` (66 CF) in both modes                    -> iretd / iretq
  - ``pushf``/``popf`` get a 0x66 prefix (16-bit) in both modes               -> pushfd / pushfq
  - 32-bit ``push/pop cs|ds|es|ss`` get a 0x66 prefix (a 2-byte push)         -> 1-byte opcodes
  - 64-bit ``mov r64, qword ptr [abs]`` (any register but rax) is encoded RIP-relative with the
    absolute value as displacement                                            -> SIB absolute form
  - 64-bit absolute memory operands no encoding reaches (2 GiB..top 2 GiB, not RIP-reachable) are
    silently truncated or sign-extended                                       -> rejected
  - ``movsd`` (string op) is rejected; 32-bit ``movsq/cmpsq/cdqe/cqo`` silently become
    movsd/cmpsd/cwde/cdq; 64-bit ``into/salc`` emit invalid opcodes          -> fixed / rejected
  - 64-bit ``ljmp/lcall SEL:OFF`` emit an opcode that does not exist in 64-bit mode -> rejected
  - ``.word`` out of range silently emits nothing; ``.equ`` redefinition silently empties the
    output; ``.error`` is silently ignored; ``mov eax, [`` assembles as ``[0]``  -> fixed / rejected
  - instruction operands with symbol expressions are silently mis-assembled: ``mov eax, 1 + S``
    and ``mov eax, -S`` become loads from ``[S]``, ``[ebx - S]`` is ``[ebx + S]``, ``[S*2 + ebx]``
    is ``[ebx + S]``; ``4 * S`` and parenthesised groups are "invalid operand"  -> the expression
    (the displacement, in a memory operand) is hoisted into a ``.set`` temporary, which keystone's
    directive parser evaluates correctly
  - ``push imm`` becomes a 16-bit push (66 6a / 66 68) for a symbol defined later, ``push dword 5``
    and 64-bit ``push 0x80000000``; ``push label`` (defined later) fails     -> ``68 imm32`` bytes
  - a symbol defined later is a sign-extended imm32 in 64-bit ``mov/add/and r64, S``; immediates
    too wide for 8/16/32-bit operands are silently truncated                -> every immediate with
    a symbol is compared, after assembly, with capstone's decoding; wrong ones are rejected
  - malformed macro arguments / .irp values / unknown ``\\name`` references hang keystone or
    silently drop the expansion (``m 1 2`` drops it)                           -> checked
  - ``nop # comment`` (comment after an operand-less instruction) fails       -> comments stripped
  - crashes (``.bss``, ``.section``, ``.cfi_*``, ``.org`` to a forward label), endless loops
    (malformed expressions such as ``.byte ^``, ``.fill %``, ``jmp % fs``, empty operands, labels
    named like conditionals, integer literals wider than 64 bits, unterminated strings, huge
    ``.align``) -> a directive whitelist and a syntax check of every expression and operand.
  - installing a symbol-resolver callback makes keystone drop every ``.align`` and evaluate
    comparisons with 64-bit constants wrongly: the code-producing instance never has one.

Left as keystone does it (documented): the ``offset`` keyword is unsupported (a bare label already
is an immediate: ``mov eax, label``); ``[rip + SYM]`` uses SYM as a displacement when SYM is a
constant defined before the use, as the target otherwise; 64-bit ``sysret``/``sysexit`` are the
REX.W forms (``sysretl``/``sysexitl`` give the 32-bit ones); ``ljmp [mem]`` takes an m16:32
pointer in both modes; ``mov ss, ax`` carries a harmless 0x66; ``.org``, ``$`` (use ``.``),
``jmp short/near`` and ``push dword`` are not supported; inside ``.macro``/``.rept``/``.irp``
bodies the hoisting and the post-assembly checks are skipped (a statement there may hold ``\\arg``
references, and labels would repeat), so the rewrites above do not see through macro arguments.
"""
from __future__ import annotations

from .api import (MODES, Program, assemble, assemble_file, assemble_firmware,
                  assemble_leave64, assemble_program, firmware_path, program_modes)
from .errors import AsmError

__all__ = [
    "AsmError", "Program", "assemble", "assemble_file", "assemble_program", "assemble_firmware",
    "assemble_leave64", "program_modes", "firmware_path", "MODES",
]
