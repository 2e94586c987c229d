"""Without starting Ray: the object-store source server's manifest and reads (only the manifest's
files, by chunk), and the `node` field of the run log's records (optional: old logs read back)."""

from __future__ import annotations

import pytest

from evomerge.execution.sources import SourceServer, manifest
from evomerge.search.records import EvalRecord, from_json, to_json


def test_the_server_reads_chunks_of_the_manifest_files_only(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (src / "sub" / "config.json").write_text("{}")
    (tmp_path / "secret").write_text("not a source file")
    files = manifest([str(src)])
    assert files == {str(src): [("model.safetensors", 1024), ("sub/config.json", 2)]}
    server = SourceServer(files)
    chunks = [server.read(str(src), "model.safetensors", off, 300) for off in range(0, 1024, 300)]
    assert [len(c) for c in chunks] == [300, 300, 300, 124]
    assert b"".join(chunks) == (src / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not a file of the shipped source"):
        server.read(str(src), "../secret", 0, 10)


def test_the_node_field_is_optional_in_the_log():
    rec = EvalRecord("candidate", 0, 1, [0.5], "h", "k", 0.25, "ok", None, {}, {"t": 4}, {"t": 4}, None, {},
                     "w0@host:1", 1.0, node="abc123")
    data = to_json(rec)
    assert data["node"] == "abc123" and from_json(data) == rec
    old = {k: v for k, v in data.items() if k != "node"}  # a record written before the field existed
    assert from_json(old).node is None
    assert "node" not in to_json(from_json(old))  # and none is written for in-process records
