"""FASTA validation rules and cropping (see sae_engine.esm.fasta's docstring)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sae_engine.esm.fasta import FastaError, Record, crop, load_fasta, write_fasta


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text(text)
    return path


def test_reads_multiline_records_with_the_documented_rules(tmp_path: Path) -> None:
    path = _write(tmp_path, ">sp|P1|A desc here\nmkt ay\nIAKQ*\n\n>P2\nXBZUO\n")
    records = load_fasta(path)
    assert [(r.id, r.sequence, r.line) for r in records] == [("sp|P1|A", "MKTAYIAKQ", 1), ("P2", "XBZUO", 5)]


@pytest.mark.parametrize(
    "text, message",
    [
        (">P1\nMKT\n>P2\nAC1D\n", r"in\.fasta:4:3: record 'P2': character '1'"),
        (">P1\nMK-T\n", r":2:3: record 'P1': character '-'"),
        (">P1\nMKJT\n", r"character 'J'"),
        (">P1\nMK*T\n", r"character '\*'"),
        (">P1\nMK*\nTT\n", r":2: record 'P1': '\*' inside the sequence"),
        (">P1\n>P2\nMK\n", r":1: record 'P1' has no residues"),
        (">P1\nMK\n>P2\nAA\n>P1\nCC\n", r":5: duplicate record id 'P1' \(first at line 1\)"),
        ("MKT\n>P1\nAA\n", r":1: sequence data before the first '>' header"),
        ("> \nAA\n", r":1: header without an id"),
        ("", r"in.fasta: no records \(the file is empty"),
        ("\n\n", r"in.fasta: no records"),
    ],
)
def test_bad_input_names_file_line_and_record(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FastaError, match=message):
        load_fasta(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.fasta"):
        load_fasta(tmp_path / "nope.fasta")


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    records = [Record("A", "M" * 130), Record("B", "KW")]
    write_fasta(records, tmp_path / "out.fasta")
    assert [(r.id, r.sequence) for r in load_fasta(tmp_path / "out.fasta")] == [("A", "M" * 130), ("B", "KW")]


def test_windows_cover_every_residue_with_overlap() -> None:
    sequence = "".join("ACDEFGHIKLMNPQRSTVWY"[i % 20] for i in range(2500))
    windows = crop([Record("long", sequence), Record("short", "MKT")], max_residues=1022, overlap=256)
    long = [w for w in windows if w.id == "long"]
    assert [w.start for w in long] == [0, 766, 1478]
    assert all(len(w.sequence) == 1022 and sequence[w.start : w.start + 1022] == w.sequence for w in long)
    assert long[-1].start + 1022 == 2500
    assert [w.key for w in windows] == ["long", "long@766", "long@1478", "short"]


def test_truncation_warns_and_never_cuts_silently() -> None:
    with pytest.warns(UserWarning, match=r"truncated 1 protein.*first 10"):
        windows = crop([Record("a", "M" * 15), Record("b", "K" * 10)], max_residues=10, mode="truncate")
    assert [len(w.sequence) for w in windows] == [10, 10]


def test_exactly_the_limit_is_one_window() -> None:
    assert len(crop([Record("a", "M" * 1022)])) == 1
    assert len(crop([Record("a", "M" * 1023)])) == 2
