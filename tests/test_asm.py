"""x86shadow.asm: the keystone front end (line-numbered errors, .include, predefined symbols,
mode header, and the rewrites of keystone 0.9.2's mis-encodings, checked with capstone)."""
import os
import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs
from capstone import x86_const as X

from x86shadow import asm, layout
from x86shadow.asm import AsmError, assemble, assemble_file, assemble_firmware, assemble_program

BASE = 0x400000


def dis(code, bits, base=BASE):
    cs = Cs(CS_ARCH_X86, CS_MODE_32 if bits == 32 else CS_MODE_64)
    cs.detail = True
    insns = list(cs.disasm(code, base))
    assert sum(i.size for i in insns) == len(code), "undecodable bytes"
    return insns


def mem_ea(insn):
    """Effective address of an absolute/RIP-relative memory operand."""
    for op in insn.operands:
        if op.type == X.X86_OP_MEM:
            if op.mem.base == X.X86_REG_RIP:
                return (insn.address + insn.size + op.mem.disp) & (2**64 - 1)
            assert op.mem.base == 0 and op.mem.index == 0
            return op.mem.disp & (2**64 - 1)
    raise AssertionError("no memory operand")


def err(src, bits=32, **kw):
    with pytest.raises(AsmError) as e:
        assemble(src, bits=bits, base=BASE, filename="prog.asm", **kw)
    return str(e.value)


# ---------------------------------------------------------------------------- errors and lines

def test_error_names_file_and_line():
    src = "# a comment\n\nmain:\n    mov eax, 1\n    foo eax\n    ret\n"
    assert err(src) == "prog.asm:5: invalid mnemonic 'foo eax'"


def test_error_line_with_forward_references_and_blocks():
    src = ("main:\n"
           "    jmp later\n"                  # forward reference before the error
           ".if 1\n"
           "    call helper\n"
           "    mov eax, [ebx+ecx+edx]\n"     # line 5: invalid operand
           ".endif\n"
           "helper: ret\n"
           "later: hlt\n")
    assert err(src) == "prog.asm:5: invalid operand 'mov eax, [ebx+ecx+edx]'"


def test_error_in_one_of_several_statements():
    assert err("nop\nnop ; bogus 1 ; nop\n") == "prog.asm:2: invalid mnemonic 'bogus 1'"


def test_undefined_symbol_is_named():
    src = "main:\n    nop\n    call helper\n    jmp main\n"
    assert err(src) == "prog.asm:3: undefined symbol 'helper'"
    assert err("nop\nmov eax, [table + 4]\n") == "prog.asm:2: undefined symbol 'table'"


def test_error_lines_inside_include(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "inner.asm").write_text("# inner\nnop\n\nmov eax, ebx, ecx\n")
    (tmp_path / "lib" / "outer.asm").write_text('nop\n.include "inner.asm"\nnop\n')
    (tmp_path / "prog.asm").write_text('main:\n.include "lib/outer.asm"\n    ret\n    badinsn\n')
    prog = str(tmp_path / "prog.asm")
    with pytest.raises(AsmError) as e:
        assemble_file(prog, bits=32, base=BASE)
    inner = os.path.join(str(tmp_path), "lib", "inner.asm")
    assert str(e.value) == f"{inner}:4: invalid operand 'mov eax, ebx, ecx'"
    assert (e.value.filename, e.value.line) == (inner, 4)
    # fix the include: the error after it is reported in the including file, right line
    (tmp_path / "lib" / "inner.asm").write_text("# inner\nnop\n\nmov eax, ebx\n")
    with pytest.raises(AsmError) as e:
        assemble_file(prog, bits=32, base=BASE)
    assert str(e.value) == f"{prog}:4: invalid mnemonic 'badinsn'"


def test_undefined_symbol_inside_include(tmp_path):
    (tmp_path / "a.asm").write_text("nop\ncall missing_fn\n")
    (tmp_path / "p.asm").write_text('.include "a.asm"\n')
    with pytest.raises(AsmError) as e:
        assemble_file(tmp_path / "p.asm", bits=64, base=BASE)
    assert str(e.value) == f"{tmp_path / 'a.asm'}:2: undefined symbol 'missing_fn'"


def test_include_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.asm").write_text('nop\n.include "b.asm"\n')
    (tmp_path / "b.asm").write_text('.include "a.asm"\n')
    with pytest.raises(AsmError, match="include cycle"):
        assemble_file(tmp_path / "a.asm", bits=32, base=BASE)
    (tmp_path / "c.asm").write_text('nop\n.include "nothere.asm"\n')
    with pytest.raises(AsmError) as e:
        assemble_file(tmp_path / "c.asm", bits=32, base=BASE)
    assert str(e.value).startswith(f"{tmp_path / 'c.asm'}:2: cannot read included file")
    with pytest.raises(AsmError, match="cannot read"):
        assemble_file(tmp_path / "none.asm", bits=32, base=BASE)


def test_include_same_file_twice_is_not_a_cycle(tmp_path):
    (tmp_path / "d.asm").write_text(".byte 7\n")
    (tmp_path / "p.asm").write_text('.include "d.asm"\n.include "d.asm"\n')
    assert assemble_file(tmp_path / "p.asm", bits=32, base=BASE) == b"\x07\x07"


def test_structural_errors():
    assert err("nop\n.if 1\nnop\n") == "prog.asm:2: '.if' without '.endif'"
    assert err("nop\n.endif\n") == "prog.asm:2: '.endif' without '.if'"
    assert err("x: nop\nx: nop\n") == "prog.asm:2: symbol 'x' redefined 'x: nop'"
    assert err('.ascii "abc\n') == "prog.asm:1: unterminated string"
    assert "numeric local labels" in err("1: jmp 1b\n")
    assert err('.if 1\n.error "not for this mode"\n.endif\n') == \
        "prog.asm:2: .error: not for this mode"


def test_errors_in_branches_not_assembled_are_not_reported():
    src = (".if BITS == 64\n    pushfq\n    mov r8, 1\n    .section .x\n.else\n    pushfd\n.endif\n"
           ".if 0\n    .error \"never\"\n    mov al, 0x1234\n.endif\n")
    assert assemble(src, bits=32, base=BASE, symbols={"BITS": 32}) == b"\x9c"


NO_ESCAPE = r"""
import sys
from x86shadow.asm import AsmError, assemble
# each of these crashes keystone, hangs it (an endless loop), silently empties or corrupts its
# output, or raises a KsError
bad = ["nop\n.section .data\nnop", ".bss", ".cfi_startproc", "nop\n.org later\nlater:",
       ".quad 0x10000000000000000", ".align 0x10000000", ".p2align 40", '.ascii "open',
       ".fill 0x7fffffff, 1, 0", "mov eax, [", "]", "mov eax,", ",", ", nop", "+", "(", "[eax]",
       ".byte ^", ".byte 1,,2", ".fill %", ".long /", ".align <", "jmp % fs : push", ".if ,",
       ".if :", ".endif :", "$: nop", ".byte $ - 1", ".irp ,", ".rept ,", ".ascii ,",
       "\x00", ".set", ".macro", "jmp", "lgdt eax", ".incbin \"/nonexistent/file\"", ".code16",
       "mov al, 0x1000", ".byte 300", ".error", "push rax", "x: .word 0x10000", "mov eax, offset x"]
for bits in (32, 64):
    for src in bad:
        try:
            assemble(src, bits=bits, base=0x400000, filename="bad.asm")
        except AsmError as e:
            assert str(e).startswith("bad.asm:"), (src, str(e))
        else:
            if not (bits == 64 and src == "push rax"):
                raise SystemExit(f"no error for {src!r}")
print("ok")
"""


def test_no_keystone_error_hang_or_crash_escapes():
    # in a subprocess: a regression must fail the test, not hang or kill the test run
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", NO_ESCAPE], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.stdout, p.stderr[-2000:])


def test_comment_after_operandless_instruction():
    # keystone rejects 'nop # comment' ("unknown token in expression")
    assert assemble("nop # c\nret   # return\nmov al, '#'  # char\n.ascii \"a#b\" # s\n",
                    bits=32, base=BASE) == b"\x90\xc3\xb0#a#b"


def test_symbol_expressions_are_not_misassembled():
    # keystone: 'mov eax, 1 + S' -> mov eax, [S]; 'mov eax, -S' -> a load from [S];
    # '[ebx - S]' -> [ebx + S]; '[S*2 + ebx]' -> [ebx + S]; '4 * S' -> invalid operand
    src = (".set S, 8\nmov eax, 1 + S\nmov eax, -S\nmov eax, 4 * S\npush 1 + S\n"
           "mov eax, [ebx - S]\nmov eax, [S*2 + ebx]\nmov eax, [ebx + 1 + S*4]\n"
           "lea eax, [ebx + ecx*2 + S - 1]\nmov eax, [4 - S]\nmov eax, . - 1\n")
    insns = dis(assemble(src, bits=32, base=BASE), 32)
    got = [(i.mnemonic, i.op_str) for i in insns]
    assert got == [("mov", "eax, 9"), ("mov", "eax, 0xfffffff8"), ("mov", "eax, 0x20"),
                   ("push", "9"), ("mov", "eax, dword ptr [ebx - 8]"),
                   ("mov", "eax, dword ptr [ebx + 0x10]"), ("mov", "eax, dword ptr [ebx + 0x21]"),
                   ("lea", "eax, [ebx + ecx*2 + 7]"), ("mov", "eax, dword ptr [0xfffffffc]"),
                   ("mov", f"eax, {insns[9].address - 1:#x}")]
    got64 = dis(assemble(".set S, 8\nmov rax, [rbx - S]\nlea rcx, [rip + x - 2]\nx: nop",
                         bits=64, base=BASE), 64)
    assert got64[0].op_str == "rax, qword ptr [rbx - 8]"
    assert mem_ea(got64[1]) == got64[2].address - 2


def test_parenthesised_symbol_expressions():
    # keystone: 'invalid operand' for a parenthesised group containing a symbol
    src = ".set A, 0x100010\n.set B, 8\nmov eax, (A & 0xffff) | (B << 16)\nmov ebx, [edi + (B)]\n"
    insns = dis(assemble(src, bits=32, base=BASE), 32)
    assert insns[0].op_str == "eax, 0x80010"
    assert insns[1].op_str == "ebx, dword ptr [edi + 8]"


# ---------------------------------------------------------------------------- symbols, programs

def test_predefined_symbols_keep_line_numbers():
    syms = {"STACK_TOP": 0xA0000, "PAGING": 3}
    code = assemble(".if PAGING == 3\nmov esp, STACK_TOP\n.endif\n", bits=32, base=BASE,
                    symbols=syms)
    assert dis(code, 32)[0].op_str == "esp, 0xa0000"
    assert err("nop\nnop\nbad\n", symbols=syms) == "prog.asm:3: invalid mnemonic 'bad'"
    assert "predefined symbol" in err("STACK_TOP: nop\n", symbols=syms)


def test_assemble_program(tmp_path):
    p = tmp_path / "prog.asm"
    p.write_text("# x86shadow: modes=32,pae\nhelper: ret\nmain:\n"
                 "    mov eax, STACK_TOP\n    mov ebx, PROG_BASE\n"
                 ".if PAGING == 3\n    mov ecx, 3\n.else\n    mov ecx, 2\n.endif\n    ret\n")
    for mode, paging in (("32", 2), ("pae", 3)):
        prog = asm.assemble_program(p, mode, 128 << 20)
        assert prog.base == prog.entry == layout.PROG_BASE
        assert prog.modes == ("32", "pae")
        insns = dis(prog.code, 32, prog.base)
        assert insns[0].mnemonic == "jmp"
        main = int(insns[0].op_str, 16)
        body = [i for i in insns if i.address >= main]
        assert body[0].op_str == f"eax, {layout.STACK_TOP:#x}"
        assert body[1].op_str == f"ebx, {layout.PROG_BASE:#x}"
        assert body[2].op_str == f"ecx, {paging}"
    with pytest.raises(AsmError) as e:
        assemble_program(p, "64", 128 << 20)
    assert str(e.value) == f"{p}:1: program supports modes 32, pae, not 64"
    assert asm.program_modes(p) == ("32", "pae")


def test_program_default_modes_and_64(tmp_path):
    p = tmp_path / "prog.asm"
    p.write_text("main:\n    mov rax, RAM_SIZE\n    ret\n")
    prog = assemble_program(p, "64", 256 << 20)
    assert prog.modes == ("32", "pae", "64")
    insns = dis(prog.code, 64, prog.base)
    assert insns[1].mnemonic in ("mov", "movabs")
    assert int(insns[1].op_str.split(", ")[1], 16) == 256 << 20


def test_program_without_main(tmp_path):
    p = tmp_path / "nomain.asm"
    p.write_text("start:\n    ret\n")
    with pytest.raises(AsmError) as e:
        assemble_program(p, "32", 128 << 20)
    assert str(e.value) == f"{p}: program does not define main"
    p.write_text("main:\n    call nowhere\n")
    with pytest.raises(AsmError) as e:
        assemble_program(p, "pae", 128 << 20)
    assert str(e.value) == f"{p}:2: undefined symbol 'nowhere'"


def test_mode_header_errors(tmp_path):
    p = tmp_path / "prog.asm"
    p.write_text("# x86shadow: modes=32,real\nmain: ret\n")
    with pytest.raises(AsmError, match="bad mode list"):
        assemble_program(p, "32", 128 << 20)


# ---------------------------------------------------------------------------- keystone fixes

@pytest.mark.parametrize("src,mn,ea", [
    ("lgdt [0x1000]", "lgdt", 0x1000),
    ("lidt [gdtr]", "lidt", None),
    ("sgdt fword ptr [0x2000]", "sgdt", 0x2000),
    ("sidt [0x3000]", "sidt", 0x3000),
])
def test_lgdt_family_32bit_has_no_operand_size_prefix(src, mn, ea):
    code = assemble(src + "\ngdtr: .short 0x7f\n.long 0", bits=32, base=BASE)
    insn = dis(code, 32)[0]
    assert insn.mnemonic == mn
    assert insn.bytes[:2] == b"\x0f\x01"           # keystone would emit 66 0f 01
    assert insn.prefix == [0, 0, 0, 0]
    assert mem_ea(insn) == (ea if ea is not None else BASE + insn.size)


def test_lgdt_family_32bit_register_and_segment_forms():
    code = assemble("lgdt [eax]\nlidt [ebp + 8]\nsgdt fs:[ebx + ecx*4 + 0x10]\nsidt [esp]",
                    bits=32, base=BASE)
    assert [(i.mnemonic, i.op_str) for i in dis(code, 32)] == [
        ("lgdt", "[eax]"), ("lidt", "[ebp + 8]"), ("sgdt", "fs:[ebx + ecx*4 + 0x10]"),
        ("sidt", "[esp]")]
    assert code.count(b"\x66") == 0


def test_lgdt_64bit_is_left_to_keystone():
    insn = dis(assemble("lgdt [0x1000]\nlidt [rax]", bits=64, base=BASE), 64)
    assert insn[0].mnemonic == "lgdt" and mem_ea(insn[0]) == 0x1000
    assert insn[1].mnemonic == "lidt" and insn[1].op_str == "[rax]"


@pytest.mark.parametrize("reg", ["rbx", "rcx", "rsp", "rbp", "rsi", "r8", "r12", "r13", "r15"])
def test_mov_r64_absolute_64bit(reg):
    # keystone: 'mov rbx, qword ptr [0x1000]' -> mov rbx, [rip + 0x1000]
    code = assemble(f"mov {reg}, qword ptr [0x1000]\nmov {reg}, [0x7ffffff8]\n"
                    f"mov {reg}, qword ptr [X + 8]\n.set X, 0x2000\nmov {reg}, [X]\n"
                    f"mov {reg}, qword ptr [0xffffffff80001000]",
                    bits=64, base=BASE)
    insns = dis(code, 64)
    assert [i.mnemonic for i in insns] == ["mov"] * 5
    assert all(i.op_str.startswith(reg + ", qword ptr [") for i in insns)
    assert [mem_ea(i) for i in insns] == [0x1000, 0x7FFFFFF8, 0x2008, 0x2000,
                                         0xFFFFFFFF80001000]


def test_mov_r64_absolute_64bit_segment_and_labels():
    code = assemble("mov rbx, qword ptr gs:[0x28]\nmov rcx, fs:[0x10]\nmov rdx, [data]\n"
                    "mov rax, [data]\ndata: .quad 5", bits=64, base=BASE)
    insns = dis(code[:-8], 64)
    assert insns[0].op_str == "rbx, qword ptr gs:[0x28]"
    assert insns[1].op_str == "rcx, qword ptr fs:[0x10]"
    data = BASE + len(code) - 8
    assert mem_ea(insns[2]) == data and mem_ea(insns[3]) == data


@pytest.mark.parametrize("src", [
    "mov rbx, qword ptr [0x80000000]",           # sign-extension would give 0xffffffff80000000
    "mov rbx, [X]\n.set X, 0x90000000",          # the same through a forward symbol
    "mov rbx, [0x100000000]",
    "mov ebx, dword ptr [0xC0000000]",           # keystone silently sign-extends
    "mov dword ptr [0xffff800000001000], 1",     # keystone silently truncates
])
def test_unencodable_64bit_absolute_addresses_are_rejected(src):
    msg = err("nop\n" + src, bits=64)
    assert msg.startswith("prog.asm:2: ") and "address" in msg


def test_other_64bit_absolute_operands_are_correct():
    forms = ["mov ebx, dword ptr [0x1000]", "mov qword ptr [0x1000], rbx", "add rbx, [0x1000]",
             "lea rbx, [0x1000]", "push qword ptr [0x1000]", "mov rax, qword ptr [0x1000]",
             "inc qword ptr [0x1000]", "cmp rbx, qword ptr [0x1000]", "invlpg [0x1000]"]
    insns = dis(assemble("\n".join(forms), bits=64, base=BASE), 64)
    assert len(insns) == len(forms)
    assert [mem_ea(i) for i in insns] == [0x1000] * len(forms)


def test_far_jump_32bit_is_ptr16_32():
    # keystone: 'ljmp 0x08:0x1000' -> 66 ea 00 10 08 00 (a 16-bit far jump)
    code = assemble("ljmp 0x08:target\njmp 0x10:0x12345678\nlcall 0x1b:0x1000\ntarget: nop",
                    bits=32, base=BASE)
    insns = dis(code, 32)
    assert code[:1] == b"\xea" and len(code) == 7 * 3 + 1
    assert struct.unpack("<IH", code[1:7]) == (BASE + 21, 0x08)
    assert struct.unpack("<IH", code[8:14]) == (0x12345678, 0x10)
    assert insns[2].mnemonic == "lcall" and struct.unpack("<IH", code[15:21]) == (0x1000, 0x1b)
    assert "does not exist in 64-bit mode" in err("ljmp 0x08:0x1000", bits=64)


def test_operand_size_fixes():
    # keystone emits iretw / pushfw / popfw / 16-bit segment pushes for these
    c32 = assemble("iret\npushf\npopf\npush ds\npush es\npush ss\npush cs\npop ds\npop es\npop ss",
                   bits=32, base=BASE)
    assert c32 == bytes([0xCF, 0x9C, 0x9D, 0x1E, 0x06, 0x16, 0x0E, 0x1F, 0x07, 0x17])
    c64 = assemble("iret\npushf\npopf\niretq\nsysretq\nsysretl\nsysexitq\nretfq\nlret", bits=64,
                   base=BASE)
    assert [(i.mnemonic) for i in dis(c64, 64)] == [
        "iretq", "pushfq", "popfq", "iretq", "sysretq", "sysret", "sysexitq", "retfq", "retf"]


def test_string_ops_and_mode_checks():
    assert assemble("rep movsd\nmovsd", bits=32, base=BASE) == b"\xf3\xa5\xa5"
    assert assemble("rep movsd\nrep movsq", bits=64, base=BASE) == b"\xf3\xa5\xf3\x48\xa5"
    assert "does not exist in 32-bit mode" in err("rep movsq")    # keystone: a silent movsd
    assert "does not exist in 32-bit mode" in err("cdqe")         # keystone: a silent cwde
    assert "does not exist in 64-bit mode" in err("into", bits=64)
    assert err("push rax") == "prog.asm:1: register 'rax' does not exist in 32-bit mode 'push rax'"


def test_immediate_width_checks():
    # keystone silently truncates or sign-extends these (checked after assembly with capstone)
    assert "does not fit in 8 bits" in err("mov al, 0x100")
    assert "does not fit in the 16-bit operand" in err(".set V, 0x10000\nmov ax, V")
    assert "does not fit in 32 bits" in err("mov ebx, 0x100000000", bits=64)
    assert "does not fit in 32 bits" in err("mov eax, -0x80000001")
    assert "use movabs" in err("mov rax, S\n.set S, 0xffffffff", bits=64)   # would be -1
    assert "does not fit" in err("and rax, S\n.set S, 0xfffff000", bits=64)
    assert "does not fit" in err("push 0x80000000", bits=64)      # keystone: 66 68 00 00
    code = assemble("mov al, -128\nmov al, 0xff\ncmp ax, 0xffff\nand eax, 0xfffff000\n"
                    "mov eax, -1\nmov al, 'A'\nmov rcx, S\n.set S, -5", bits=64, base=BASE)
    assert len(dis(code, 64)) == 7


def test_push_immediate_is_32_bit():
    # keystone: 'push S' (S defined later) and 'push 0x80000000' (64-bit) become 16-bit pushes
    # (66 6a / 66 68); 'push label' (label defined later) is an "invalid fixup" in 32-bit mode
    code = assemble("push S\npush later\npush -1\n.set S, 8\nlater: nop", bits=32, base=BASE)
    insns = dis(code, 32)
    assert [(i.bytes[0], i.op_str) for i in insns[:3]] == [
        (0x68, "8"), (0x68, f"{BASE + 15:#x}"), (0x68, "0xffffffff")]
    insns = dis(assemble("push S\npush fwd\n.set S, 8\nfwd: nop", bits=64, base=BASE), 64)
    assert [i.op_str for i in insns[:2]] == ["8", f"{BASE + 10:#x}"]


def test_macro_arguments_and_parameters_are_checked():
    m = ".macro m a\n.byte \\a\n.endm\n"
    assert "bad macro argument '^'" in err(m + "m ^")           # keystone: endless loop
    assert "bad macro argument '1 2'" in err(m + "m 1 2")       # keystone: expansion dropped
    assert "not a parameter" in err(".rept 2\n\\a\n.endr")       # keystone: endless loop
    assert err(".macro m\n.if 1\npushfq\n.endif\n.endm\nnop\nm") == \
        "prog.asm:3: 'pushfq' does not exist in 32-bit mode (expanded from prog.asm:7)"
    assert assemble(m + "m 5\nm 'a'", bits=32, base=BASE) == b"\x05a"


def test_directive_fixes():
    # keystone: '.word 0x10000' silently emits nothing; '.equ' redefinition empties the output
    assert "value out of range" in err("x: .word 0x10000")
    assert assemble(".word 0x1234\n.equ A, 1\n.equ A, 2\n.byte A", bits=32, base=BASE) == \
        b"\x34\x12\x02"
    assert "unsupported directive '.section'" in err(".section .data")
    assert "not supported" in err(".code64")


def test_control_and_system_instructions_encode_as_written():
    src32 = ("mov cr3, eax\nmov eax, cr0\nmov cr4, ecx\ninvlpg [eax]\n"
             "lock cmpxchg8b qword ptr [esi]\n"
             "iretd\nretf\nltr ax\nwrmsr\nrdmsr\nlidt [eax]\nsysenter\nsysexit\nhlt\ncli\nsti")
    want32 = ["mov", "mov", "mov", "invlpg", "lock cmpxchg8b", "iretd", "retf", "ltr", "wrmsr",
              "rdmsr", "lidt", "sysenter", "sysexit", "hlt", "cli", "sti"]
    insns = dis(assemble(src32, bits=32, base=BASE), 32)
    assert [i.mnemonic for i in insns] == want32
    assert all(0x66 not in i.prefix for i in insns)
    src64 = ("mov cr3, rax\nmov rax, cr2\ninvlpg [rdi]\nlock cmpxchg16b xmmword ptr [rsi]\n"
             "iretq\nretfq\nltr ax\nwrmsr\nswapgs\nsyscall\nsysret")
    want64 = ["mov", "mov", "invlpg", "lock cmpxchg16b", "iretq", "retfq", "ltr", "wrmsr", "swapgs",
              "syscall", "sysretq"]
    assert [i.mnemonic for i in dis(assemble(src64, bits=64, base=BASE), 64)] == want64


def test_align_is_honoured():
    # keystone drops every .align once a symbol resolver is installed: the code-producing
    # instance never has one
    code = assemble("jmp x\n.balign 16\nx: .long x", bits=32, base=BASE)
    assert len(code) == 20 and struct.unpack("<I", code[16:]) == (BASE + 16,)


def test_macros_and_repeats():
    src = (".macro putb v\n.byte \\v\n.endm\nputb 1\nputb 2\n.rept 2\nnop\n.endr\n"
           ".irp r, eax, ebx\npush \\r\n.endr\n")
    assert assemble(src, bits=32, base=BASE) == b"\x01\x02\x90\x90\x50\x53"


# ---------------------------------------------------------------------------- firmware

def test_firmware_is_cached_and_deterministic():
    a = assemble_firmware("32", 128 << 20)
    assert assemble_firmware("32", 128 << 20) is a
    assert assemble_firmware("pae", 128 << 20) != a
    assert assemble_firmware("32", 256 << 20) != a
    for mode in ("32", "pae", "64"):
        fw = assemble_firmware(mode, 128 << 20)
        assert fw[0] == 0xE9 and fw[5:16] == b"\x90" * 11
        assert fw[16:20] == b"\xfa\xf4\xeb\xfc"              # fw_unhandled: cli; hlt; jmp
        assert layout.FW_BASE + len(fw) <= layout.FW_GDT


def test_firmware_ram_checks():
    with pytest.raises(AsmError):
        assemble_firmware("32", (4 << 30) + (4 << 20))
    with pytest.raises(AsmError):
        assemble_firmware("pae", 32 << 20)
    with pytest.raises(ValueError):
        assemble_firmware("16", 128 << 20)
    assert asm.firmware_path("pae").name == "boot32.asm"
    assert asm.firmware_path("64").is_file()
