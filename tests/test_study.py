"""``sae-engine study``: the corpus apart from the evaluation proteins, nested scales, reuse, resume.

The evaluation proteome is the real fixture under tests/data/go (280 Swiss-Prot proteins with GO
annotations; 40-50 each of olfactory receptors, ribosomal proteins and kinases); the flat concept
set groups those three families by their GO term. The training corpus is random sequences plus
evaluation proteins under their own and under other accessions (which the exclusion must catch);
ESM2 is a small randomly initialised fair-esm module (weights may not live in tests/).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_engine.apps.study import run_study
from sae_engine.apps.study_config import StudyConfigError, load_study
from sae_engine.apps.study_corpus import prepare_corpus
from sae_engine.esm.fasta import read_fasta

GO = Path(__file__).parent / "data" / "go"
TESTS = Path(__file__).parent
FAMILY_TERMS = {"GO:0004984": "olfactory_receptor", "GO:0003735": "ribosomal_protein", "GO:0004672": "kinase"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A random ESM2, a corpus FASTA with evaluation proteins hidden in it, and a flat family table."""
    from sae_engine.esm.models import random_esm2
    from esm_fixtures import save_hf_esm2

    tmp = tmp_path_factory.mktemp("study-inputs")
    save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp / "esm2")
    evaluation = list(read_fasta(GO / "population.fasta"))
    g = np.random.default_rng(0)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    lines = [f">T{i:04d}\n{''.join(g.choice(letters, int(g.integers(40, 260))))}\n" for i in range(360)]
    lines += [f">{r.id}\n{r.sequence}\n" for r in evaluation[:12]]  # an evaluation accession
    lines += [f">COPY{i}\n{r.sequence}\n" for i, r in enumerate(evaluation[12:24])]  # an evaluation sequence
    order = g.permutation(len(lines))
    (tmp / "corpus.fasta").write_text("".join(lines[i] for i in order))
    members: dict[str, set[str]] = {}
    for line in (GO / "annotations.tsv").read_text().splitlines():
        if not line.startswith("#"):
            accession, term = line.split("\t")
            members.setdefault(term, set()).add(accession)
    rows = sorted((a, family) for term, family in FAMILY_TERMS.items() for a in members.get(term, ()))
    (tmp / "families.tsv").write_text("accession\tfamily\n" + "".join(f"{a}\t{f}\n" for a, f in rows))
    return tmp


def _study(inputs: Path, out: Path, scales=(60, 200), extra: str = "") -> Path:
    text = f"""
out_dir = "{out}"
[corpus]
source = "fasta"
fasta = "{inputs / 'corpus.fasta'}"
scales = {list(scales)}
[evaluation]
fasta = "{GO / 'population.fasta'}"
go_annotations = "{GO / 'annotations.tsv'}"
ontology = "{GO / 'go_subset.obo'}"
pfam = "{inputs / 'families.tsv'}"
top_n = 20
max_term_share = 0.25
random_subset_draws = 3
[esm]
model = "{inputs / 'esm2'}"
layers = [1]
precision = "fp32"
device = "cpu"
[[variant]]
name = "residue"
n_latents = 48
k = 4
batch_size = 512
min_tokens = 12000
set = ["train.checkpoint_every=10", "train.eval_every=10"]
[[variant]]
name = "protein"
level = "protein"
n_latents = 24
k = 3
batch_size = 64
min_tokens = 1500
{extra}
"""
    path = out.parent / f"{out.name}.toml"
    path.write_text(text)
    return path


def test_the_corpus_excludes_evaluation_proteins_by_accession_and_by_sequence(inputs, tmp_path):
    config = load_study(_study(inputs, tmp_path / "s"))
    corpus = prepare_corpus(config, tmp_path, log=lambda _: None)
    evaluation = list(read_fasta(GO / "population.fasta"))
    training = [r for part in corpus.parts for r in read_fasta(part)]
    assert [r.id for r in training] == corpus.order and len(training) == 200
    assert not {r.id for r in training} & {r.id for r in evaluation}
    assert not {r.sequence for r in training} & {r.sequence for r in evaluation}
    assert all(50 <= len(r.sequence) <= 1000 for r in training)
    hidden = [r for r in read_fasta(inputs / "corpus.fasta") if 50 <= len(r.sequence) <= 1000]
    by_id = sum(r.id in {e.id for e in evaluation} for r in hidden)
    assert corpus.stats["excluded_by_accession"] == by_id > 0
    assert corpus.stats["excluded_by_sequence"] == sum(r.id.startswith("COPY") for r in hidden) > 0
    assert corpus.evaluation_ids == [r.id for r in evaluation if 50 <= len(r.sequence) <= 1000]


def test_smaller_corpora_are_prefixes_of_larger_ones(inputs, tmp_path):
    small = prepare_corpus(load_study(_study(inputs, tmp_path / "a", scales=(60,))), tmp_path, log=lambda _: None)
    large = prepare_corpus(load_study(_study(inputs, tmp_path / "b", scales=(60, 150, 250))), tmp_path,
                           log=lambda _: None)
    assert large.order[:60] == small.order and large.order[:150] == large.order[:60] + [
        r.id for r in read_fasta(large.parts[1])]
    assert [len(list(read_fasta(p))) for p in large.parts] == [60, 90, 100]
    with pytest.raises(StudyConfigError, match="exceeds"):
        prepare_corpus(load_study(_study(inputs, tmp_path / "c", scales=(60, 100000))), tmp_path, log=lambda _: None)


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "clean"
    path = _study(inputs, out)
    return path, run_study(load_study(path), progress=False, log=lambda _: None)


def test_a_tiny_study_runs_end_to_end(finished):
    path, study = finished
    out = Path(load_study(path).out_dir)
    assert [(p["variant"], p["scale"]) for p in study["points"]] == [
        ("residue", 60), ("residue", 200), ("protein", 60), ("protein", 200)]
    assert set(study["evaluation"]["concepts"]) == {"go", "pfam"} and study["evaluation"]["concepts"]["pfam"]["flat"]
    for point in study["points"]:
        assert point["training"]["steps"] > 0 and point["training"]["eval_fvu"] < 1.0
        for concept in point["concepts"].values():
            assert set(concept["families"]) == {"sae", "neurons", "random_directions", "random_dictionary"}
            assert concept["families"]["random_dictionary"]["units"] == point["n_latents"]  # a dictionary of its size
            assert concept["families"]["neurons"]["units"] == 64 and concept["families"]["random_directions"]["units"] == 32
            subsets = concept["vs_neurons_random_subsets"]
            assert subsets["units_each"] == min(point["n_latents"], 64) and len(subsets["b"]["distinct_terms"]) == 3
    assert json.loads((out / "study.json").read_text()) == study
    rows = (out / "study.tsv").read_text().splitlines()
    assert rows[0].startswith("variant\tlevel\tkind") and len(rows) == 1 + 4 * 2 * 6
    assert (out / "report" / "curves.png").stat().st_size > 10_000
    assert "curves.png" in (out / "report" / "index.html").read_text()
    # the second residue run trained on the 60 proteins of the first and 140 more (the part stores)
    assert (out / "stores" / "part-0" / "manifest.json").exists() and (out / "stores" / "part-1" / "manifest.json").exists()


def test_a_second_run_extracts_and_trains_nothing(finished, monkeypatch):
    import sae_engine.esm.extract as extract
    import sae_engine.training.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a finished study extracted or trained again")

    monkeypatch.setattr(extract, "extract_to_store", refuse)
    monkeypatch.setattr(trainer, "train", refuse)
    path, study = finished
    assert run_study(load_study(path), progress=False, log=lambda _: None) == study


def test_changed_settings_in_a_finished_study_are_an_error(finished, tmp_path):
    path, _ = finished
    text = path.read_text()
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace("n_latents = 48\nk = 4", "n_latents = 48\nk = 5"))
    with pytest.raises(StudyConfigError, match="variant\\]\\] residue: .* other settings"):
        run_study(load_study(changed), progress=False, log=lambda _: None)
    changed.write_text(text.replace("top_n = 20", "top_n = 25"))
    with pytest.raises(StudyConfigError, match="other \\[evaluation\\] / \\[esm\\] settings \\(top_n\\)"):
        run_study(load_study(changed), progress=False, log=lambda _: None)


KILLER = """
import sys
sys.path.insert(0, {tests!r})
from kill import die_before_step
import sae_engine.training.trainer as trainer
from sae_engine.apps.study import run_study
from sae_engine.apps.study_config import load_study

run = trainer.Trainer.run
def run_or_die(self):
    if self.run_dir.name == "L1-200" and self.run_dir.parent.name == "residue":
        die_before_step(self, 30)
    return run(self)
trainer.Trainer.run = run_or_die
run_study(load_study({path!r}), progress=False, log=lambda _: None)
"""


def test_a_killed_study_resumes_to_the_same_study_json(inputs, finished, tmp_path):
    _, clean = finished
    path = _study(inputs, tmp_path / "killed")
    script = KILLER.format(tests=str(TESTS), path=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    out = tmp_path / "killed"
    run_dir = out / "runs" / "residue" / "L1-200"
    assert (out / "points" / "residue" / "L1-60.json").exists() and not (run_dir / "study_run.json").exists()
    assert (run_dir / "checkpoints").exists()  # the killed run left a checkpoint to resume from
    assert run_study(load_study(path), progress=False, log=lambda _: None) == clean


@pytest.mark.parametrize("text, message", [
    ("[corpus]\nscales = [100, 100]\n[[variant]]\nname = 'a'", "corpus.scales = \\[100, 100\\]: must be distinct"),
    ("[corpus]\nscale = [1]\n[[variant]]\nname = 'a'", "corpus.scale: unknown key"),
    ("[esm]\nlayers = 'four'\n[[variant]]\nname = 'a'", "esm.layers = 'four': expected a list"),
    ("[[variant]]\nname = 'a'\nlevel = 'window'", "variant\\[0\\].level = 'window': must be one of"),
    ("[[variant]]\nname = 'a'\nk = 64\nn_latents = 32", "variant\\[0\\].k = 64"),
    ("[[variant]]\nname = 'a'\nscales = [7]", "variant\\[0\\].scales = \\[7\\]: \\[7\\] not in corpus.scales"),
    ("[evaluation]\nconcepts = ['go', 'kegg']\n[[variant]]\nname = 'a'", "evaluation.concepts"),
    ("seed = 0\n", "no \\[\\[variant\\]\\] table"),
    ("[corpus\n", "not valid TOML"),
])
def test_a_bad_study_file_is_one_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(StudyConfigError, match=message) as error:
        load_study(path)
    assert str(path) in str(error.value)


def test_the_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    from sae_engine.cli import main

    path = tmp_path / "bad.toml"
    path.write_text("[[variant]]\nname = 'a'\nkind = 'relu'\n")
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "variant[0].kind = 'relu'" in err[0]


def test_repeated_corpora_keep_the_held_out_head_out_of_training():
    import torch

    from sae_engine.apps.study_sources import EpochSource, RepeatTail
    from sae_engine.data.sources import ArraySource

    rows = ArraySource(torch.arange(10.0)[:, None], chunk_size=3)
    repeated = RepeatTail(rows, head=2, total=25)
    served = torch.cat(list(repeated.iter_from(0))).ravel().tolist()
    assert served == list(range(10)) + list(range(2, 10)) + list(range(2, 9))  # 25 rows, the head once
    assert torch.cat(list(repeated.iter_from(13))).ravel().tolist() == served[13:]  # a resumed buffer's read
    assert repeated.rows(torch.tensor([24, 0, 10])).ravel().tolist() == [8.0, 0.0, 2.0]
    epochs = EpochSource(np.arange(6.0)[:, None], head=1, epochs=3, seed=0, chunk_size=4)
    served = torch.cat(list(epochs.iter_from(0))).ravel().tolist()
    assert len(epochs) == 16 and served[0] == 0.0 and 0.0 not in served[1:]
    passes = [sorted(served[1 + 5 * e : 6 + 5 * e]) for e in range(3)]
    assert passes == [[1.0, 2.0, 3.0, 4.0, 5.0]] * 3 and served[1:6] != served[6:11]  # each epoch reshuffled
    assert torch.cat(list(epochs.iter_from(7))).ravel().tolist() == served[7:]
