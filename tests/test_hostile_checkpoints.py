"""Hostile and malformed model files: every case is one clear line (WeightsError / InputError;
exit code 2 from the CLIs, no traceback), before anything large is allocated. Cases that used to
hang or exhaust memory run in a subprocess, under a timeout and an address-space limit
(`resource.setrlimit(RLIMIT_AS)`), so that a regression fails the test, not the machine."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from blip2_jax.models.configs import Limits
from blip2_jax.preprocess import ImageProcessor, InputError
from blip2_jax.weights import hf
from blip2_jax.weights.safetensors_io import LazyStateDict, WeightsError, read_header, save_state_dict
from tests.conftest import GOLDEN

MiB = 2**20


def one_line(exc_info, pattern: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and re.search(pattern, msg), msg
    assert "reshape" not in msg and "shape mismatch: cannot" not in msg, msg
    return msg


def write_st(path, header, data: bytes = b"", n: int | None = None) -> str:
    """A safetensors file from a header (dict -> JSON, or raw bytes) and a data region."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), start=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


Z8 = b"\0" * 8
HEADERS = [  # (case, header, data, message)
    ("json list", b"[1, 2]", b"", r"not a JSON object"),
    ("json string", b'"weights"', b"", r"not a JSON object"),
    ("invalid utf-8", b'{"w\xff": 1}', b"", r"not UTF-8"),
    ("not json", b'{"w": ', b"", r"corrupt safetensors header: Expecting value"),
    ("entry not an object", {"w": [1, 2]}, b"", r"tensor 'w': entry is a list, not an object"),
    ("empty entry", {"w": {}}, b"", r"tensor 'w': entry has no dtype, shape, data_offsets"),
    ("float offsets", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, Z8,
     r"data_offsets \[0.0, 8.0\] are not two integers"),
    ("bool offsets", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [False, False]}}, b"",
     r"data_offsets \[False, False\] are not two integers"),
    ("negative offset", {"w": entry(start=-8, end=0)}, Z8, r"data_offsets \[-8, 0\] are not two integers"),
    ("dtype as a list", {"w": entry(dtype=["F32"])}, Z8, r"unknown dtype \['F32'\]"),
    ("unknown dtype", {"w": entry(dtype="Q7")}, Z8, r"tensor 'w': unknown dtype 'Q7'"),
    ("shape of strings", {"w": entry(shape=["2"])}, Z8, r"shape \['2'\] is not a list of non-negative integers"),
    ("negative shape", {"w": entry(shape=[-1])}, Z8, r"shape \[-1\] is not a list of non-negative integers"),
    ("bytes disagree with shape", {"w": entry(shape=[3])}, Z8, r"shape \[3\] of F32 needs 12 bytes but its "
     r"data_offsets \[0, 8\] span 8"),
    ("overlapping offsets", {"a": entry(start=0, end=8), "b": entry(start=4, end=12)}, b"\0" * 12,
     r"tensor 'b' overlaps tensor 'a'"),
    ("gap", {"a": entry(start=0, end=8), "b": entry(start=12, end=20)}, b"\0" * 20,
     r"4 bytes before tensor 'b' belong to no tensor"),
    ("offsets past the end", {"a": entry()}, b"\0" * 4, r"tensor 'a' ends at byte 8 of a 4-byte data region: "
     r"the file is truncated"),
    ("trailing bytes", {"a": entry()}, b"\0" * 12, r"4 bytes after the last tensor belong to no tensor"),
    ("duplicate name", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": '
     b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', Z8, r"name 'a' appears twice"),
    ("metadata not strings", {"__metadata__": {"format": 1}, "a": entry()}, Z8,
     r"__metadata__ must map strings to strings"),
    ("nested 100000 deep", b'{"a":' * 100000 + b"1" + b"}" * 100000, b"", r"nested too deeply"),
]


@pytest.mark.parametrize("case,header,data,message", HEADERS, ids=[h[0] for h in HEADERS])
def test_safetensors_header(tmp_path, case, header, data, message):
    path = write_st(tmp_path / "model.safetensors", header, data)
    with pytest.raises(WeightsError) as e:
        LazyStateDict([path])
    assert one_line(e, message).startswith(path)


@pytest.mark.parametrize("raw,message", [
    (b"\x01\x02", r"not a safetensors file \(too short: 2 bytes\)"),
    (struct.pack("<Q", 1000) + b"{}", r"header length 1000 runs past the end of the file \(10 bytes\): truncated"),
    (struct.pack("<Q", 2**40) + b"{}", r"header length 1099511627776 > 100000000"),
])
def test_safetensors_file_framing(tmp_path, raw, message):
    (tmp_path / "x.safetensors").write_bytes(raw)
    with pytest.raises(WeightsError) as e:
        read_header(str(tmp_path / "x.safetensors"))
    one_line(e, message)


def test_valid_header_round_trips(tmp_path):
    sd = {"b": np.arange(3, dtype=np.float32), "a": np.zeros((2, 0), np.float32)}
    save_state_dict(sd, str(tmp_path))
    got = LazyStateDict([str(tmp_path / "model.safetensors")])
    assert sorted(got) == ["a", "b"] and np.array_equal(got["b"], sd["b"]) and got["a"].shape == (2, 0)
    assert not got["b"].flags.writeable  # a view of the read-only memory map


# ----------------------------------------------------------------------------------------------
# Model directories: sharded indexes, missing / misshapen / mistyped tensors
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def itm_dir(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_itm", d)
    return d


def state_dict(d) -> dict:
    return {k: np.array(v) for k, v in LazyStateDict([str(d / "model.safetensors")]).items()}


def sharded(d, max_shard_bytes=2**16) -> tuple[dict, list[str]]:
    """Re-saves d's weights as shards + index; -> (index dict, shard names)."""
    sd = state_dict(d)
    (d / "model.safetensors").unlink()
    names = save_state_dict(sd, str(d), max_shard_bytes=max_shard_bytes)
    assert len(names) >= 3
    return json.loads((d / "model.safetensors.index.json").read_text()), names


def write_index(d, index):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def load_error(d, pattern) -> str:
    with pytest.raises(WeightsError) as e:
        hf.load(str(d))
    return one_line(e, pattern)


@pytest.mark.parametrize("content,message", [
    ("{", r"checkpoint index is not valid JSON"),
    ("[]", r"checkpoint index must be a JSON object, not a list"),
    ('{"weight_map": ["a.safetensors"]}', r"weight_map must be a non-empty object .* not a list"),
    ('{"weight_map": {}}', r"weight_map must be a non-empty object"),
    ('{"weight_map": {"w": "/etc/passwd"}}', r"shard '/etc/passwd' points outside the model directory"),
    ('{"weight_map": {"w": "../outside/x.safetensors"}}', r"shard '../outside/x.safetensors' points outside"),
    ('{"weight_map": {"w": "sub/../../x.safetensors"}}', r"points outside the model directory"),
    ('{"weight_map": {"w": 3}}', r"invalid shard name 3"),
])
def test_index_file(itm_dir, content, message):
    (itm_dir / "model.safetensors").unlink()
    (itm_dir / "model.safetensors.index.json").write_text(content)
    load_error(itm_dir, message)


def test_index_shard_that_is_a_directory(itm_dir):
    index, names = sharded(itm_dir)
    (itm_dir / "shard_dir").mkdir()
    index["weight_map"] = {k: "shard_dir" if v == names[1] else v for k, v in index["weight_map"].items()}
    write_index(itm_dir, index)
    load_error(itm_dir, r"shard_dir is a directory, not a regular file")


def test_index_shard_symlinked_outside(itm_dir, tmp_path):
    _, names = sharded(itm_dir)
    (tmp_path / "outside").mkdir()
    shutil.move(itm_dir / names[1], tmp_path / "outside" / names[1])
    os.symlink(tmp_path / "outside" / names[1], itm_dir / names[1])
    load_error(itm_dir, rf"shard '{names[1]}' is a link leading outside the model directory")


def test_tensor_in_two_shards(itm_dir):
    _, names = sharded(itm_dir)
    shard0 = {k: np.array(v) for k, v in LazyStateDict([str(itm_dir / names[0])]).items()}
    shard1 = {k: np.array(v) for k, v in LazyStateDict([str(itm_dir / names[1])]).items()}
    dup = next(iter(shard0))
    save_state_dict({**shard1, dup: shard0[dup]}, str(itm_dir / "tmp"))
    os.replace(itm_dir / "tmp" / "model.safetensors", itm_dir / names[1])
    load_error(itm_dir, rf"tensor '{re.escape(dup)}' is in two files: .*{names[0]} and .*{names[1]}")


def crowded(index) -> tuple[str, str, str]:
    """(a tensor, its shard, another shard) where the tensor's shard holds other tensors too."""
    shards = list(dict.fromkeys(index["weight_map"].values()))
    for name, shard in index["weight_map"].items():
        if list(index["weight_map"].values()).count(shard) > 1:
            return name, shard, next(s for s in shards if s != shard)
    raise AssertionError("no shard holds two tensors")


def test_tensor_in_a_shard_the_index_does_not_name(itm_dir):
    index, _ = sharded(itm_dir)
    name, shard, other = crowded(index)
    index["weight_map"][name] = other
    write_index(itm_dir, index)
    load_error(itm_dir, rf"{shard}: tensor '{re.escape(name)}' is in this shard but "
                        rf"model.safetensors.index.json puts it in {other}")


def test_index_and_shards_disagree(itm_dir):
    index, _ = sharded(itm_dir)
    name, shard, _ = crowded(index)
    del index["weight_map"][name]
    write_index(itm_dir, index)
    load_error(itm_dir, rf"{shard}: tensor '{re.escape(name)}' is not listed in model.safetensors.index.json")
    index["weight_map"][name] = shard
    index["weight_map"]["ghost.weight"] = shard
    write_index(itm_dir, index)
    load_error(itm_dir, rf"lists tensors no shard holds: ghost.weight \({shard}\)")


def test_missing_and_truncated_shards(itm_dir):
    _, names = sharded(itm_dir)
    data = (itm_dir / names[1]).read_bytes()
    (itm_dir / names[1]).write_bytes(data[:-100])
    load_error(itm_dir, rf"{names[1]}: tensor '.*' ends at byte \d+ of a \d+-byte data region: the file is truncated")
    (itm_dir / names[1]).unlink()
    load_error(itm_dir, rf"shard\(s\) listed in model.safetensors.index.json are missing: {names[1]}")


def test_released_model_never_invents_missing_tensors(itm_dir):
    sd = state_dict(itm_dir)
    del sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_state_dict(sd, str(itm_dir))
    load_error(itm_dir, r"missing tensors: .*vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight")


def test_tensor_that_does_not_fit_the_config_names_file_and_tensor(itm_dir):
    sd = state_dict(itm_dir)
    sd["itm_head.bias"] = np.zeros(3, np.float32)
    save_state_dict(sd, str(itm_dir))
    load_error(itm_dir, r"model\.safetensors: tensor itm_head\.bias: checkpoint shape \(3,\) != expected \(2,\)")
    sd["itm_head.bias"] = np.zeros(2, np.int64)
    save_state_dict(sd, str(itm_dir))
    load_error(itm_dir, r"tensor itm_head\.bias: checkpoint dtype int64 where a floating-point tensor is expected")


# ----------------------------------------------------------------------------------------------
# config.json, generation_config.json, preprocessor_config.json
# ----------------------------------------------------------------------------------------------
def edit_config(d, edit):
    conf = json.loads((d / "config.json").read_text())
    edit(conf)
    (d / "config.json").write_text(json.dumps(conf))


def set_field(section, name, value):
    def edit(conf):
        (conf[section] if section else conf)[name] = value
    return edit


CONFIGS = [  # (case, directory, edit, message)
    ("vision heads 0", "blip2_itm", set_field("vision_config", "num_attention_heads", 0),
     r"vision_config.num_attention_heads=0 must be positive"),
    ("vision heads negative", "blip2_itm", set_field("vision_config", "num_attention_heads", -4),
     r"vision_config.num_attention_heads=-4 must be positive"),
    ("vision heads not dividing", "blip2_itm", set_field("vision_config", "num_attention_heads", 5),
     r"vision_config.num_attention_heads=5 does not divide vision_config.hidden_size=32"),
    ("qformer heads not dividing", "blip2_itm", set_field("qformer_config", "num_attention_heads", 3),
     r"qformer_config.num_attention_heads=3 does not divide qformer_config.hidden_size=32"),
    ("opt heads 0", "blip2_opt", set_field("text_config", "num_attention_heads", 0),
     r"text_config.num_attention_heads=0 must be positive"),
    ("t5 heads 0", "blip2_t5", set_field("text_config", "num_heads", 0), r"text_config.num_heads=0 is outside"),
    ("cross-attention frequency 0", "blip2_itm", set_field("qformer_config", "cross_attention_frequency", 0),
     r"qformer_config.cross_attention_frequency=0 must be positive"),
    ("patch size 0", "blip2_itm", set_field("vision_config", "patch_size", 0),
     r"vision_config.patch_size=0 must be positive"),
    ("patch size not dividing", "blip2_itm", set_field("vision_config", "patch_size", 7),
     r"vision_config.patch_size=7 does not divide vision_config.image_size=48"),
    ("ffn_dim 10**9", "blip2_opt", set_field("text_config", "ffn_dim", 10**9),
     r"text_config.ffn_dim=1000000000 is outside \[1, 65536\] \(limit max_width; see BLIP2_JAX_LIMITS\)"),
    ("image size 10**6", "blip2_itm", set_field("vision_config", "image_size", 10**6),
     r"vision_config.image_size=1000000 is outside \[1, 4096\]"),
    ("width as a string", "blip2_itm", set_field("vision_config", "hidden_size", "32"),
     r"vision_config.hidden_size must be an integer, got '32'"),
    ("bool width", "blip2_itm", set_field("qformer_config", "hidden_size", True),
     r"qformer_config.hidden_size must be an integer, got True"),
    ("vision_config a list", "blip2_itm", set_field("", "vision_config", [1]),
     r"vision_config must be a JSON object"),
    ("eos outside the vocabulary", "blip2_opt", set_field("text_config", "eos_token_id", 10**6),
     r"text_config.eos_token_id=1000000 is outside \[0, 50271\]"),
    ("unknown activation", "blip2_itm", set_field("vision_config", "hidden_act", "swish7"),
     r"vision_config.hidden_act='swish7' is not a supported activation"),
]


@pytest.mark.parametrize("case,src,edit,message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_arithmetic_and_types(tmp_path, case, src, edit, message):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / src, d)
    edit_config(d, edit)
    with pytest.raises(WeightsError) as e:
        hf.read_config(str(d))
    assert one_line(e, message).startswith(str(d / "config.json"))


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", r"config.json must be a JSON object, not a list"),
    (b'{"model_type": "blip-2\xff"}', r"config.json is not UTF-8 text"),
    (b"{", r"config.json is not valid JSON"),
])
def test_config_file_types(itm_dir, content, message):
    (itm_dir / "config.json").write_bytes(content)
    with pytest.raises(WeightsError) as e:
        hf.read_config(str(itm_dir))
    one_line(e, message)


def test_limits_are_overridable(tmp_path, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_opt", d)
    edit_config(d, set_field("text_config", "ffn_dim", 70000))
    with pytest.raises(WeightsError, match="ffn_dim=70000 is outside"):
        hf.read_config(str(d))
    assert hf.read_config(str(d), Limits(max_width=2**17))[0].text.ffn_dim == 70000
    monkeypatch.setenv("BLIP2_JAX_LIMITS", "max_width=131072")
    assert hf.read_config(str(d))[0].text.ffn_dim == 70000
    monkeypatch.setenv("BLIP2_JAX_LIMITS", "max_width=lots")
    with pytest.raises(ValueError, match=r"BLIP2_JAX_LIMITS: 'max_width=lots' is not name=positive integer"):
        Limits.from_env()


@pytest.mark.parametrize("content,message", [
    ("{", r"generation_config.json is not valid JSON"),
    ("[1]", r"generation_config.json: must be a JSON object, not list"),
    ('{"num_beams": 0}', r"num_beams=0 is outside \[1, "),
    ('{"max_new_tokens": "20"}', r"max_new_tokens must be an integer, got '20'"),
    ('{"eos_token_id": [2, 1000000]}', r"eos_token_id=1000000 is outside \[0, 50271\]"),
    ('{"top_p": 3}', r"top_p=3 is not in \(0, 1\]"),
])
def test_generation_config(tmp_path, content, message):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_opt", d)
    (d / "generation_config.json").write_text(content)
    cfg, _ = hf.read_config(str(d))
    with pytest.raises(WeightsError) as e:
        hf.read_generation_config(str(d), cfg)
    one_line(e, message)


@pytest.mark.parametrize("content,message", [
    ("{", r"preprocessor_config.json is not valid JSON"),
    ("[]", r"preprocessor_config.json must be a JSON object, not a list"),
    ('{"size": 1000000}', r"size 1000000 is not an integer in \[1, 4096\] \(limit max_image_size"),
    ('{"size": {"height": 224, "width": 300}}', r"non-square size"),
    ('{"size": "224"}', r"size '224' is not an integer"),
    ('{"image_std": [0.2, 0, 0.3]}', r"image_std \[0.2, 0, 0.3\] has a zero"),
    ('{"image_mean": [0.5]}', r"image_mean \[0.5\] is not a list of 3 numbers"),
    ('{"resample": 99}', r"resample 99 is not one of"),
    ('{"do_resize": "yes"}', r"do_resize must be true or false"),
])
def test_preprocessor_config(tmp_path, content, message):
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(InputError) as e:
        ImageProcessor.from_dir(tmp_path)
    one_line(e, message)


@pytest.mark.parametrize("damage,message", [
    ("remove", r"cannot load the tokenizer: no tokenizer files"),
    ("corrupt", r"model: cannot load the tokenizer: JSONDecodeError"),
])
def test_tokenizer_missing_or_corrupt_is_one_line(tmp_path, damage, message):
    from blip2_jax import serving
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_opt", d, ignore=shutil.ignore_patterns("no_bos"))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (d / f).exists():
            if damage == "remove":
                (d / f).unlink()
            elif f == "tokenizer.json":
                (d / f).write_text("{not json")
    with pytest.raises(WeightsError) as e:  # the tokenizer loads beside the weights, in a thread
        serving.Predictor.from_dir(str(d))
    assert one_line(e, message).count("cannot load the tokenizer") == 1
