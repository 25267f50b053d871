"""Reading a binary's exported symbols, to tell a Python process from any other.

Before `livepatch attach` touches a process it must know that the process runs CPython
and which version: loading the injection stub into anything else (a shell, `sleep`, a
JVM) would at best do nothing and at worst kill it. Every CPython binary that can load
extension modules exports the C API from its dynamic symbol table (`.dynsym`) — either
the `python3.X` executable itself or the `libpython3.X.so` it links — and since 3.11 it
also exports `Py_Version`, a read-only 32-bit constant holding `PY_VERSION_HEX`.

So the question "is this CPython, and which one?" is answered from the files the process
has mapped, without running them and without reading the process's memory: find the
ELF object whose `.dynsym` defines `PyGILState_Ensure`, and read `Py_Version` from the
file section that holds it. This module is that reader: a small, bounds-checked parser of
64-bit little-endian ELF files (x86-64, aarch64) that only ever reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_SHT_DYNSYM = 11
_SHN_UNDEF = 0

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")

#: a CPython binary's symbol tables are a few hundred kilobytes; refuse anything absurd
_MAX_TABLE = 64 * 1024 * 1024


class NotElf(ValueError):
    """The file is not a 64-bit little-endian ELF object this reader understands."""


@dataclass(frozen=True)
class Section:
    addr: int
    offset: int
    size: int


@dataclass(frozen=True)
class ElfSymbols:
    """The defined dynamic symbols of one ELF file, and a way to read their bytes."""

    path: Path
    symbols: dict[str, int]
    sections: tuple[Section, ...]

    def read(self, name: str, size: int) -> bytes | None:
        """The `size` bytes of the file that the defined symbol `name` points at."""
        addr = self.symbols.get(name)
        if addr is None:
            return None
        for section in self.sections:
            if section.addr <= addr and addr + size <= section.addr + section.size:
                with self.path.open("rb") as f:
                    f.seek(section.offset + addr - section.addr)
                    data = f.read(size)
                return data if len(data) == size else None
        return None


def dynamic_symbols(path: Path, wanted: frozenset[str]) -> ElfSymbols:
    """The addresses of those `wanted` names that `path` defines in its `.dynsym`."""
    with path.open("rb") as f:
        size = f.seek(0, 2)

        def read_at(offset: int, length: int) -> bytes:
            if offset < 0 or length < 0 or offset + length > size or length > _MAX_TABLE:
                raise NotElf(f"{path} is truncated or malformed")
            f.seek(offset)
            return f.read(length)

        ident = read_at(0, _EHDR.size) if size >= _EHDR.size else b""
        if ident[:4] != _ELF_MAGIC:
            raise NotElf(f"{path} is not an ELF file")
        if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
            raise NotElf(f"{path} is not a 64-bit little-endian ELF file")
        header = _EHDR.unpack(ident)
        shoff, shentsize, shnum = header[6], header[11], header[12]
        if shoff == 0 or shnum == 0 or shentsize < _SHDR.size:
            raise NotElf(f"{path} has no section headers")
        table = read_at(shoff, shnum * shentsize)
        headers = [_SHDR.unpack_from(table, i * shentsize) for i in range(shnum)]
        sections = tuple(
            Section(addr=h[3], offset=h[4], size=h[5])
            for h in headers
            if h[3] and h[4] + h[5] <= size
        )
        symbols: dict[str, int] = {}
        for h in headers:
            if h[1] != _SHT_DYNSYM or h[6] >= shnum:
                continue
            strtab = read_at(headers[h[6]][4], headers[h[6]][5])
            # look the few wanted names up in the string table first, so the symbol
            # table is scanned for integers rather than decoded name by name
            offsets: dict[int, str] = {}
            for name in wanted:
                encoded = b"\0" + name.encode() + b"\0"
                at = strtab.find(encoded)
                while at >= 0:
                    offsets[at + 1] = name
                    at = strtab.find(encoded, at + 1)
            if not offsets:
                continue
            entsize = h[9] or _SYM.size
            if entsize != _SYM.size:
                raise NotElf(f"{path} has symbols of an unexpected size ({entsize})")
            raw = read_at(h[4], h[5] - h[5] % entsize)
            for st_name, _info, _other, st_shndx, st_value, _size in _SYM.iter_unpack(raw):
                found = offsets.get(st_name)
                if found is not None and st_shndx != _SHN_UNDEF:
                    symbols[found] = st_value
    return ElfSymbols(path=path, symbols=symbols, sections=sections)
