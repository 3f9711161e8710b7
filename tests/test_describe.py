"""LLM feature descriptions through the real anthropic SDK, against a Messages API on loopback."""
from __future__ import annotations

import json
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("anthropic")

from sae_engine.apps.describe import CachedClient, ProteinInfo, describe_features, parse_predictions  # noqa: E402
from sae_engine.evaluation.features import ProteinActivations  # noqa: E402

OLFACTORY = "PF13853"


class MessagesAPI(BaseHTTPRequestHandler):
    """A tiny stand-in model: names olfactory features, and predicts from Pfam when told so."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        MessagesAPI.requests.append(body)
        prompt = body["messages"][0]["content"]
        if "In one sentence" in prompt:
            top = prompt.split("\n")[1]
            text = "Detects olfactory receptors." if OLFACTORY in top else "Detects nothing in particular."
        else:
            lines = re.findall(r"^(\d+)\. (.*)$", prompt, flags=re.MULTILINE)
            smell = "olfactory" in prompt.split("\n")[0]
            text = "\n".join(f"{i}. {10 if smell and OLFACTORY in line else zlib.crc32(line.encode()) % 11}"
                             for i, line in lines)
        reply = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                 "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                 "usage": {"input_tokens": 10, "output_tokens": 10}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), MessagesAPI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    MessagesAPI.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _data():
    g = np.random.default_rng(0)
    ids = [f"P{i:03d}" for i in range(60)]
    smell = np.arange(60) < 20
    info = {p: ProteinInfo([OLFACTORY] if s else ["PF00001"], ["olfactory receptor activity"] if s else ["binding"])
            for p, s in zip(ids, smell)}
    f0 = np.where(smell, 1 + g.random(60), 0.0)  # fires on olfactory receptors only
    f1 = np.where(g.random(60) < 0.5, g.random(60), 0.0)
    dense = np.stack([f0, f1], axis=1).astype(np.float32)
    return ProteinActivations(ids, sp.csr_matrix(dense), sp.csr_matrix((dense > 0).astype(np.float32))), info


def test_descriptions_are_scored_against_held_out_proteins_and_cached(server, tmp_path):
    acts, info = _data()
    client = CachedClient(tmp_path / "cache", model="test-model", api_key="test-key", base_url=server)
    results = describe_features(client, acts, [0, 1], info, per_bin=5)
    assert [r.text for r in results] == ["Detects olfactory receptors.", "Detects nothing in particular."]
    assert results[0].score > 0.5
    assert not results[0].null_score > 0.5  # another feature's description does not predict f0
    asked = len(MessagesAPI.requests)
    assert asked == 6 and MessagesAPI.requests[0]["model"] == "test-model"
    again = describe_features(client, acts, [0, 1], info, per_bin=5)
    assert len(MessagesAPI.requests) == asked  # every prompt came from the cache
    assert [r.score for r in again] == [r.score for r in results]


def test_prediction_parsing_tolerates_missing_lines():
    out = parse_predictions("1. 7\n2) 3.5\nsomething else\n4: 10", 4)
    assert out[:2].tolist() == [7.0, 3.5] and np.isnan(out[2]) and out[3] == 10.0


def test_cli_describes_a_demo_folder_through_the_api(server, tmp_path, monkeypatch, capsys):
    from sae_engine.cli import main

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert main(["describe", "--demo", str(tmp_path)]) == 2
    assert "set ANTHROPIC_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")

    acts, info = _data()
    demo = tmp_path / "demo"
    demo.mkdir()
    acts.save(demo / "sae_activations.npz")
    (demo / "sae_enrichment.tsv").write_text(
        "feature\tgo_id\tgo_name\tnamespace\tstudy_count\tstudy_size\tpop_count\tpop_size\tfold_enrichment\t"
        "p_value\tq_value\tlog10_p\tmost_specific\nf0\tGO:0004984\tolfactory receptor activity\tMF\t20\t20\t20\t60\t3\t"
        "1e-12\t1e-10\t-12\t1\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "human_pfam.tsv").write_text("accession\tpfam_id\n" + "".join(f"{p}\t{i.pfam[0]}\n" for p, i in info.items()))
    (data / "go_annotations.tsv").write_text("accession\tgo_id\n")
    assert main(["describe", "--demo", str(demo), "--base-url", server, "--data-dir", str(data), "--model", "m"]) == 0
    lines = (demo / "descriptions.tsv").read_text().splitlines()
    assert lines[1].startswith("f0\t") and lines[1].endswith("Detects olfactory receptors.")
