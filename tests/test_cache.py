"""Quantized-model cache: bit-identical restore, rejection of damaged entries, one build across
processes, stable keys and fingerprints."""
import copy
import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from quantizers.cache import (QuantCache, QuantEntry, QuantizedTensor, apply_entry, cache_key, dequantize,
                              model_fingerprint, plain_group_index)
from quantizers.primitives import fake_quantize

KEY = cache_key("model", {"method": "rtn", "bits": 3, "group_size": 16}, None, "v1")
META = {"layers": [{"name": "0", "bits": 3, "numel": 2048}], "bpw": {"model": 4.25}, "seconds": 0.5,
        "method": {"name": "rtn", "sym": False}}


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8)).to(dtype)


@torch.no_grad()
def quantize_in_place(model: nn.Module) -> QuantEntry:
    """What a quantizer does: RTN 3-bit group 16 written back, a scale folded into the LayerNorm
    (as AWQ does), an input-scale buffer; returns the entry that records it."""
    entry = QuantEntry(meta=copy.deepcopy(META))
    device = model[0].weight.device   # where quantize() leaves an entry: on the model's device
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight
        q = fake_quantize(weight, bits=3, group_size=16)
        weight.copy_(q.dequantized)
        entry.weights[f"{name}.weight"] = QuantizedTensor(q.codes, q.scale, q.zero,
                                                          plain_group_index(weight.shape[1], 16).to(device))
    model[1].weight.mul_(torch.linspace(0.5, 2.0, 32, dtype=model[1].weight.dtype, device=device))
    entry.raw["1.weight"] = model[1].weight.clone()
    entry.state["0.awq_input_scale"] = torch.linspace(1.0, 3.0, 64, device=device)
    return entry


def saved(tmp_path: Path) -> tuple[QuantCache, QuantEntry]:
    cache = QuantCache(tmp_path)
    entry = quantize_in_place(make_model())
    cache.save(KEY, entry)
    return cache, entry


def entry_digest(entry: QuantEntry) -> str:
    """A digest of every tensor and the meta, to compare entries across processes."""
    digest = hashlib.sha256(json.dumps(entry.meta, sort_keys=True).encode())
    tensors = {f"b/{k}": v for k, v in entry.state.items()} | {f"r/{k}": v for k, v in entry.raw.items()}
    for name, w in entry.weights.items():
        w = w.unpacked()   # a loaded entry keeps 4-bit codes packed
        tensors.update({f"w/{name}/{part}": getattr(w, part) for part in ("codes", "scale", "zero", "group_index")})
    for name in sorted(tensors):
        digest.update(name.encode() + str(tensors[name].dtype).encode() + tensors[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_restores_bit_identical_weights(tmp_path, dtype):
    original = make_model(dtype)
    quantized, fresh = copy.deepcopy(original), copy.deepcopy(original)
    entry = quantize_in_place(quantized)
    cache = QuantCache(tmp_path)
    cache.save(KEY, entry)
    path = tmp_path / "quantized" / KEY[:2] / f"{KEY}.safetensors"
    assert cache.path(KEY) == path
    assert cache.sidecar(KEY).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    loaded = cache.load(KEY)
    apply_entry(fresh, loaded)
    for (name, restored), (_, expected), (_, before) in zip(fresh.named_parameters(), quantized.named_parameters(),
                                                            original.named_parameters()):
        assert restored.dtype == dtype and torch.equal(restored, expected), name
        assert name.endswith("bias") or not torch.equal(restored, before), name  # it did change
    assert loaded.meta == META
    assert torch.equal(loaded.state["0.awq_input_scale"], entry.state["0.awq_input_scale"])
    assert all(torch.equal(loaded.weights[n].unpacked().codes, w.codes) for n, w in entry.weights.items())


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_survive_packing_with_an_odd_width_and_any_group_mapping(tmp_path, bits):
    codes = torch.randint(0, 2 ** bits, (5, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    group_index = torch.randperm(33, generator=torch.Generator().manual_seed(2)) % 3  # act-order style
    weight = QuantizedTensor(codes, torch.rand(5, 3) + 0.1, torch.randint(0, 2 ** bits, (5, 3)).float(), group_index)
    cache = QuantCache(tmp_path)
    cache.save(KEY, QuantEntry(weights={"w": weight}))
    names = safetensors.torch.load(cache.path(KEY).read_bytes()).keys()
    assert ("weight/w/codes4" in names) == (bits <= 4)
    loaded = cache.load(KEY).weights["w"]
    assert loaded.packed == (bits <= 4)   # kept packed in memory: unpacked where it is applied
    loaded = loaded.unpacked()
    assert torch.equal(loaded.codes, codes) and torch.equal(loaded.group_index, group_index)
    expected = torch.stack([weight.scale[:, g] * (codes[:, j].float() - weight.zero[:, g])
                            for j, g in enumerate(group_index.tolist())], dim=1)
    assert torch.equal(dequantize(loaded.codes, loaded.scale, loaded.zero, loaded.group_index, torch.float32), expected)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))


def bad_metadata(path: Path) -> None:
    """A file whose checksum verifies but whose metadata is not JSON."""
    data = safetensors.torch.save({"raw/x": torch.zeros(2)}, {"vlmqb_cache": "{not json"})
    path.write_bytes(data)
    path.with_suffix(".sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


DAMAGE = {"corrupt": flip_middle,
          "truncated": lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
          "no_sidecar": lambda path: path.with_suffix(".sha256").unlink(),
          "bad_metadata": bad_metadata}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_discarded_and_rebuilt_once(tmp_path, damage):
    cache, entry = saved(tmp_path)
    path = cache.path(KEY)
    DAMAGE[damage](path)
    with pytest.warns(UserWarning, match=path.name):
        assert cache.load(KEY) is None
    assert not path.exists() and not cache.sidecar(KEY).exists()
    calls = []
    rebuilt, built = cache.get_or_build(KEY, lambda: calls.append(1) or quantize_in_place(make_model()))
    assert built and calls == [1]
    assert entry_digest(cache.load(KEY)) == entry_digest(rebuilt) == entry_digest(entry)
    assert cache.get_or_build(KEY, lambda: calls.append(1))[1] is False and calls == [1]


def _build_in_child(root: str, counter: str, barrier, results, write_behind: bool) -> None:
    def build() -> QuantEntry:
        time.sleep(1.0)  # long enough that the other process reaches the lock meanwhile
        with open(counter, "a") as file:
            file.write(f"{os.getpid()}\n")
        return quantize_in_place(make_model())
    barrier.wait()  # both processes call get_or_build at the same moment
    cache = QuantCache(Path(root), write_behind)
    entry, built = cache.get_or_build(KEY, build)
    cache.close()
    results.put((built, entry_digest(entry)))


@pytest.mark.parametrize("write_behind", [False, True])
def test_concurrent_processes_build_once(tmp_path, write_behind):
    """Written behind, the entry's lock goes to the writing thread: the other process still waits
    and loads."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    counter = tmp_path / "builds.txt"
    workers = [context.Process(target=_build_in_child,
                               args=(str(tmp_path), str(counter), barrier, results, write_behind))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    assert sorted(built for built, _ in outcomes) == [False, True]
    assert outcomes[0][1] == outcomes[1][1]


def test_cache_key_is_stable_and_covers_every_part():
    parts = ["fingerprint", {"bits": 3, "group_size": 16}, {"dataset": "coco", "n": 128}, "v1"]
    key = cache_key(*parts)
    assert key == cache_key(*parts) == cache_key("fingerprint", {"group_size": 16, "bits": 3},
                                                 {"n": 128, "dataset": "coco"}, "v1")  # key order is irrelevant
    assert key == hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    changed = ["fingerprint2", {"bits": 4, "group_size": 16}, {"dataset": "coco", "n": 64}, "v2"]
    for i, part in enumerate(changed):
        assert cache_key(*parts[:i], part, *parts[i + 1:]) != key, i
    with pytest.raises(TypeError):
        cache_key(object())  # no str() fallback: its output would not be stable


def test_model_fingerprint_changes_with_one_element():
    model = make_model()
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(copy.deepcopy(model)) == model_fingerprint(make_model())
    with torch.no_grad():
        model[2].weight[3, 5] = torch.nextafter(model[2].weight[3, 5], torch.tensor(float("inf")))  # one ulp
    assert model_fingerprint(model) != fingerprint
    assert model_fingerprint(make_model(torch.bfloat16)) != fingerprint


def test_apply_entry_rejects_a_mismatched_entry_without_touching_the_model(tmp_path):
    _, entry = saved(tmp_path)
    model = make_model()
    before = model_fingerprint(model)
    with pytest.raises(KeyError, match="9.weight"):
        apply_entry(model, QuantEntry(weights=entry.weights, raw={"9.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match="1.weight"):
        apply_entry(model, QuantEntry(weights=entry.weights, raw={"1.weight": torch.ones(16)}))
    assert model_fingerprint(model) == before


def test_written_behind_the_files_are_the_same_and_readers_wait_for_them(tmp_path, monkeypatch):
    """get_or_build hands back the entry before it is on disk; a reader elsewhere waits for the
    write and loads it; the files are byte for byte those of a plain save."""
    plain, _ = saved(tmp_path / "plain")
    gate, real_write = threading.Event(), QuantCache._write
    monkeypatch.setattr(QuantCache, "_write", lambda *args: gate.wait(30) and real_write(*args))
    behind = QuantCache(tmp_path / "behind", write_behind=True)
    entry, built = behind.get_or_build(KEY, lambda: quantize_in_place(make_model()))
    assert built and not behind.path(KEY).exists(), "handed back before the write"
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(QuantCache(tmp_path / "behind").load(KEY)))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive(), "a reader waits on the entry's lock while it is written"
    gate.set()
    reader.join(30)
    behind.close()
    assert loaded[0] is not None and entry_digest(loaded[0]) == entry_digest(entry)
    for file in (plain.path(KEY), plain.sidecar(KEY)):
        assert file.read_bytes() == (behind.root / file.relative_to(plain.root)).read_bytes()


def test_a_failed_write_behind_warns_and_loses_only_the_entry(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("No space left on device")
    monkeypatch.setattr(QuantCache, "_write", fail)
    cache = QuantCache(tmp_path, write_behind=True)
    entry, built = cache.get_or_build(KEY, lambda: quantize_in_place(make_model()))
    assert built and entry.weights
    with pytest.warns(UserWarning, match="could not write .*No space left"):
        cache.close()
    assert cache.load(KEY) is None, "nothing half-written; the lock was given back"


def test_change_markers_tell_which_parameters_changed():
    """The coverage check's markers: unchanged parameters keep theirs; one changed element, or
    two swapped ones, change them (integer sums of the raw bits, the second position-weighted)."""
    from quantizers.cache import change_markers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3).to(torch.bfloat16))
    before = change_markers(model)
    assert list(before) == [name for name, _ in model.named_parameters()]
    assert all(isinstance(v, int) for pair in before.values() for v in pair)
    with torch.no_grad():
        model[0].weight[1, 2] += 1.0
        w = model[1].weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
    after = change_markers(model)
    assert after["0.weight"] != before["0.weight"] and after["1.weight"] != before["1.weight"]
    assert after["0.bias"] == before["0.bias"] and after["1.bias"] == before["1.bias"]
    assert after["1.weight"][0] == before["1.weight"][0]   # a swap keeps the plain sum: the weighted one tells


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_host_copy_packs_codes_that_fit_4_bits_and_gives_them_back(bits):
    codes = torch.randint(0, 2 ** bits, (6, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    codes[0, 0] = 2 ** bits - 1   # the grid's top code is there
    weight = QuantizedTensor(codes, torch.rand(6, 3) + 0.1, torch.zeros(6, 3), torch.arange(33) % 3)
    host = weight.to_host()
    assert host.packed == (bits <= 4) and host.shape == (6, 33)
    assert host.codes.shape == ((6, 17) if bits <= 4 else (6, 33))
    assert torch.equal(host.unpacked().codes, codes) and host.unpacked().packed is False
    assert host.to_host().packed == host.packed and torch.equal(host.to_host().codes, host.codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_entry_packed_by_its_host_copy_saves_and_restores_bit_identical_weights(tmp_path, dtype):
    """quantize() hands the cache entries packed by QuantizedTensor.to_host: written as they
    are, read back packed, applied (unpacked on the model's device) to the quantized weights."""
    original = make_model(dtype)
    quantized, fresh, reapplied = copy.deepcopy(original), copy.deepcopy(original), copy.deepcopy(original)
    entry = quantize_in_place(quantized)
    entry.weights = {name: w.to_host() for name, w in entry.weights.items()}
    assert all(w.packed for w in entry.weights.values())
    cache = QuantCache(tmp_path)
    cache.save(KEY, entry)
    names = safetensors.torch.load(cache.path(KEY).read_bytes()).keys()
    assert {n for n in names if n.endswith("/codes4")} == {f"weight/{n}/codes4" for n in entry.weights}
    apply_entry(fresh, cache.load(KEY))
    apply_entry(reapplied, entry)   # the kept entry itself (a config applied again after an FP use)
    pairs = zip(fresh.named_parameters(), reapplied.named_parameters(), quantized.named_parameters())
    for (name, restored), (_, again), (_, expected) in pairs:
        assert torch.equal(restored, expected) and torch.equal(again, expected), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: entries are applied where models are")
def test_a_host_entry_applied_to_a_gpu_model_gives_its_quantized_weights():
    original = make_model(torch.bfloat16).cuda()
    quantized, fresh = copy.deepcopy(original), copy.deepcopy(original)
    entry = quantize_in_place(quantized)
    entry.weights = {name: w.to_host() for name, w in entry.weights.items()}
    entry.raw = {name: t.cpu() for name, t in entry.raw.items()}
    entry.state = {name: t.cpu() for name, t in entry.state.items()}
    torch.cuda.synchronize()
    apply_entry(fresh, entry)
    for (name, restored), (_, expected) in zip(fresh.named_parameters(), quantized.named_parameters()):
        assert restored.is_cuda and torch.equal(restored, expected), name


def test_an_entrys_own_host_buffers_are_written_as_they_are_and_views_and_shared_storage_copied(tmp_path):
    """The cache writes quantize()'s host copies without copying them again on the run's thread;
    what safetensors refuses (a view into a larger buffer, two names on one storage) it copies."""
    from quantizers.cache import _encode
    owned, base = torch.arange(6.0).reshape(2, 3), torch.arange(12.0)
    entry = QuantEntry(raw={"a": owned, "b": base[6:].view(2, 3), "c": owned}, meta={"m": 1})
    tensors = _encode(entry)
    assert tensors["raw/a"].data_ptr() == owned.data_ptr()
    for name, source in (("raw/b", base[6:]), ("raw/c", owned)):
        copied = tensors[name]
        assert copied.data_ptr() != source.data_ptr() and torch.equal(copied.reshape(-1), source.reshape(-1))
    cache = QuantCache(tmp_path)
    cache.save(KEY, entry)
    assert all(torch.equal(cache.load(KEY).raw[name], tensor) for name, tensor in entry.raw.items())
