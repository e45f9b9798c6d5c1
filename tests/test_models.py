"""The embedded model's cache: a killed conversion leaves nothing behind, a waiting process says so."""
import logging
import threading
import time

import pytest
from filelock import FileLock

from polyalign import models


def fake_convert(target):
    target.mkdir()
    (target / "config.json").write_text("{}")


def test_a_killed_conversions_temporary_folder_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYALIGN_CACHE", str(tmp_path))
    stale = tmp_path / "gemma-3-270m.tmp12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert models.embedded_gemma_path() == tmp_path / "gemma-3-270m"
    assert not stale.exists()


def test_a_failed_conversion_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYALIGN_CACHE", str(tmp_path))

    def failing(target):
        target.with_name(target.name + ".tmp1").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_convert_gguf", failing)
    try:
        models.embedded_gemma_path()
    except OSError:
        pass
    # the stale folder is swept by the next conversion, which must then succeed
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    models.embedded_gemma_path()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m", "gemma-3-270m.lock"]


@pytest.mark.slow
def test_waiting_for_another_conversion_is_said(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("POLYALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    held = FileLock(str(tmp_path / "gemma-3-270m.lock"))
    held.acquire()
    result = {}
    with caplog.at_level(logging.WARNING, logger="polyalign.models"):
        worker = threading.Thread(target=lambda: result.setdefault("path", models.embedded_gemma_path()))
        worker.start()
        time.sleep(3)                       # past the 2 s after which it says that it waits
        assert worker.is_alive() and "path" not in result
        held.release()
        worker.join(10)
    assert result["path"] == tmp_path / "gemma-3-270m"
    assert any("waiting for another process" in r.getMessage() for r in caplog.records)


def test_a_run_shares_one_tokenizer_and_nothing_outlives_the_block(tiny_llama_path):
    from polyalign.models import load_model, load_tokenizer, sharing_tokenizers
    apart = [load_model(tiny_llama_path, "fp32", "cpu", progress=False).tokenizer for _ in range(2)]
    assert apart[0] is not apart[1]
    with sharing_tokenizers():
        a = load_model(tiny_llama_path, "fp32", "cpu", progress=False)
        with sharing_tokenizers():          # a nested block keeps the outer one's tokenizers
            b = load_model(tiny_llama_path, "fp32", "cpu", progress=False)
        assert a.tokenizer is b.tokenizer and a.model is not b.model
        assert load_tokenizer(tiny_llama_path) is a.tokenizer     # neurons and tune-lens load it alone
        assert a.tokenizer("a b c").input_ids == apart[0]("a b c").input_ids
        assert a.tokenizer.pad_token_id is not None
    assert load_model(tiny_llama_path, "fp32", "cpu", progress=False).tokenizer is not a.tokenizer


def test_the_plain_view_gguf_reader_reads_what_the_stock_reader_reads(tmp_path):
    """The conversion's faster GGUF reader: every field (strings, scalars, arrays of strings and numbers,
    as a tokenizer's vocabulary is stored) and every tensor equal the stock reader's, type for type."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.count", 7)
    w.add_float32("test.scale", 0.5)
    w.add_string("test.name", "täst")
    w.add_array("test.tokens", ["<pad>", "▁hello", "世界", "", "x" * 300])
    w.add_array("test.scores", [0.0, -1.5, 2.25])
    w.add_array("test.types", [1, 2, 3, 4])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal(16).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    stock = gguf.GGUFReader(path)
    reader_cls = models._plain_view_reader(gguf.GGUFReader)
    assert reader_cls is not gguf.GGUFReader            # the fast reader is in use with the locked gguf
    plain = reader_cls(path)
    assert list(plain.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.data, other.types) == (field.offset, field.data, field.types), name
        assert len(other.parts) == len(field.parts), name
        for a, b in zip(field.parts, other.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert [t.name for t in plain.tensors] == [t.name for t in stock.tensors] == ["a.weight", "b.weight"]
    for a, b in zip(stock.tensors, plain.tensors):
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
        assert (a.tensor_type, list(a.shape), a.data_offset) == (b.tensor_type, list(b.shape), b.data_offset)
