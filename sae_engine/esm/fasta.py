"""FASTA reading with validation, and cropping of long proteins to the model's context.

Rules applied to every record (one rule per case, so a user can predict the outcome):

- The record id is the header's first whitespace-separated word (``>sp|P69905|HBA_HUMAN desc``
  gives ``sp|P69905|HBA_HUMAN``).
- Residues are upper-cased; spaces inside sequence lines are ignored; one trailing ``*``
  (a stop codon written by translators) is dropped.
- Allowed residues are those of ESM's alphabet: the 20 standard amino acids plus ``X`` (unknown),
  ``B`` (D/N), ``Z`` (E/Q), ``U`` (selenocysteine) and ``O`` (pyrrolysine); ESM has a token for
  each, so they pass through unchanged.
- Anything else (digits, gap characters ``-``/``.``, ``*`` inside a sequence, ``J``...), an empty
  record, text before the first header, an id seen twice, or a file with no record at all raises
  :class:`FastaError`, naming the file, line and record.

Proteins longer than the model's limit (1022 residues for ESM2, 1024 tokens with BOS/EOS) are
never cut silently: :func:`crop` splits them into overlapping windows (default) or truncates
them with a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Residue letters ESM2's alphabet has a token for.
ESM_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")
#: ESM2 was trained on crops of 1022 residues (+ BOS + EOS = 1024 positions).
ESM2_MAX_RESIDUES = 1022


class FastaError(ValueError):
    """A FASTA file breaks a rule of the module docstring; the message names file, line and record."""


@dataclass(frozen=True)
class Record:
    """One protein: its id, its validated upper-case sequence, the header's 1-based line number."""

    id: str
    sequence: str
    line: int = 0


@dataclass(frozen=True)
class Window:
    """A piece of a protein fed to the model: residues ``[start, start + len(sequence))``.

    ``start`` is 0 for a protein that fits; ``key`` identifies the window uniquely.
    """

    id: str
    sequence: str
    start: int = 0

    @property
    def key(self) -> str:
        return self.id if self.start == 0 else f"{self.id}@{self.start}"


def read_fasta(path: str | Path) -> Iterator[Record]:
    """Stream validated records from a FASTA file (ids are checked for duplicates as they come)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FASTA file not found: {path}")
    seen: dict[str, int] = {}
    header: tuple[str, int] | None = None
    parts: list[str] = []

    def finish() -> Record:
        record_id, line = header  # type: ignore[misc]
        sequence = "".join(parts)
        if sequence.endswith("*"):
            sequence = sequence[:-1]
        if not sequence:
            raise FastaError(f"{path}:{line}: record {record_id!r} has no residues")
        return Record(record_id, sequence, line)

    with path.open("r", encoding="ascii", errors="replace") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                continue
            if text.startswith(">"):
                if header is not None:
                    yield finish()
                words = text[1:].split()
                if not words:
                    raise FastaError(f"{path}:{number}: header without an id")
                record_id = words[0]
                if record_id in seen:
                    raise FastaError(f"{path}:{number}: duplicate record id {record_id!r} (first at line {seen[record_id]})")
                seen[record_id] = number
                header, parts = (record_id, number), []
                continue
            if header is None:
                raise FastaError(f"{path}:{number}: sequence data before the first '>' header")
            residues = text.replace(" ", "").replace("\t", "").upper()
            if parts and parts[-1].endswith("*"):
                raise FastaError(f"{path}:{number - 1}: record {header[0]!r}: '*' inside the sequence")
            bad = set(residues.rstrip("*")) - ESM_RESIDUES
            if bad:
                char = min(bad, key=residues.index)
                column = raw.upper().index(char) + 1
                raise FastaError(
                    f"{path}:{number}:{column}: record {header[0]!r}: character {char!r} is not an ESM residue"
                    f" (allowed: {''.join(sorted(ESM_RESIDUES))}; lowercase is accepted)"
                )
            parts.append(residues)
    if header is None:
        raise FastaError(f"{path}: no records (the file is empty or holds no '>' header)")
    yield finish()


def load_fasta(path: str | Path) -> list[Record]:
    """All validated records of a FASTA file, in file order."""
    return list(read_fasta(path))


def write_fasta(records: Iterable[Record], path: str | Path, width: int = 60) -> None:
    """Write records as FASTA with ``width`` residues per line (not atomic: callers rename)."""
    with Path(path).open("w", encoding="ascii") as handle:
        for record in records:
            handle.write(f">{record.id}\n")
            for lo in range(0, len(record.sequence), width):
                handle.write(record.sequence[lo : lo + width] + "\n")


def crop(
    records: Iterable[Record],
    max_residues: int = ESM2_MAX_RESIDUES,
    mode: str = "window",
    overlap: int = 256,
) -> list[Window]:
    """Fit proteins to the model's context.

    ``mode="window"``: a long protein becomes windows of ``max_residues`` overlapping by at least
    ``overlap`` residues, the last one flush with the protein's end, so every residue is covered
    and windows share context. Overlapping residues then appear once per window: pooled or
    residue-level statistics that must count each residue once should keep a window's first
    ``overlap // 2`` residues only where ``start > 0`` (the store records ``start``).
    ``mode="truncate"``: keep the first ``max_residues`` residues and warn once with the count.
    """
    if mode not in ("window", "truncate"):
        raise ValueError(f"crop mode must be 'window' or 'truncate', got {mode!r}")
    if mode == "window" and not 0 <= overlap < max_residues:
        raise ValueError(f"window overlap must be in [0, {max_residues}), got {overlap}")
    windows: list[Window] = []
    truncated: list[str] = []
    step = max_residues - overlap
    for record in records:
        length = len(record.sequence)
        if length <= max_residues:
            windows.append(Window(record.id, record.sequence))
        elif mode == "truncate":
            truncated.append(record.id)
            windows.append(Window(record.id, record.sequence[:max_residues]))
        else:
            starts = list(range(0, length - max_residues, step)) + [length - max_residues]
            windows.extend(Window(record.id, record.sequence[s : s + max_residues], s) for s in starts)
    if truncated:
        warnings.warn(
            f"truncated {len(truncated)} protein(s) longer than {max_residues} residues to their first"
            f" {max_residues} (e.g. {', '.join(truncated[:3])}); use window cropping to keep every residue",
            stacklevel=2,
        )
    return windows
