"""Hostile files that used to hang or exhaust memory, and the command-line tools on hostile
files. Each case runs in a subprocess under a timeout and, for the memory cases, an
address-space limit (`resource.setrlimit(RLIMIT_AS)`), so that a regression fails the test
instead of taking the machine down; the CLIs must exit 2 with one line and no traceback."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import GOLDEN, ROOT

ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def run_python(code: str, *, limit_mib: int | None = None, env: dict | None = None, timeout: int = 120) -> dict:
    """Runs `code` in a fresh interpreter (under an address-space limit) -> the JSON it prints
    last. `code` reports with `report(**fields)`; peak resident memory is added as `peak_mib`."""
    prelude = textwrap.dedent(f"""
        import json, resource, re
        if {limit_mib!r}:
            resource.setrlimit(resource.RLIMIT_AS, ({limit_mib} << 20, {limit_mib} << 20))
        def report(**fields):
            hwm = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
            print(json.dumps(dict(fields, peak_mib=hwm / 1024)))
    """)
    run = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout, env=dict(ENV, **(env or {})))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def expect_error(call: str) -> str:
    """Code that runs `call` and reports the one-line error it must raise."""
    return textwrap.dedent(f"""
        from blip2_jax.preprocess import InputError
        from blip2_jax.weights.safetensors_io import WeightsError
        try:
            {call}
            report(error=None)
        except (WeightsError, InputError) as e:
            report(error=str(e))
    """)


def png(path, width: int, height: int, bit_depth: int = 8) -> str:
    """A valid greyscale PNG of zeros, written without holding its pixels (the IDAT stream is
    compressed row by row): a 13000 x 13000 16-bit one is ~330 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + width * bit_depth // 8)
    z, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Hangs: FIFOs are refused before open() can block
# ----------------------------------------------------------------------------------------------
def test_fifos_are_refused_not_opened(tmp_path):
    cases = {}
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        d = tmp_path / name.replace(".", "_")
        shutil.copytree(GOLDEN / "blip2_itm", d)
        (d / name).unlink()
        os.mkfifo(d / name)
        cases[name] = str(d)
    os.mkfifo(tmp_path / "image.png")
    out = run_python(f"""
        from blip2_jax.preprocess import ImageProcessor, InputError, load_image
        from blip2_jax.weights import hf
        from blip2_jax.weights.safetensors_io import WeightsError
        cases = {cases!r}
        errors = {{}}
        for name, call in [("model.safetensors", lambda: hf.load(cases["model.safetensors"])),
                           ("config.json", lambda: hf.read_config(cases["config.json"])),
                           ("preprocessor_config.json", lambda: ImageProcessor.from_dir(cases["preprocessor_config.json"])),
                           ("image", lambda: load_image({str(tmp_path / "image.png")!r}))]:
            try:
                call()
            except (WeightsError, InputError) as e:
                errors[name] = str(e)
        report(errors=errors)
    """, timeout=120)
    errors = out["errors"]
    assert set(errors) == {"model.safetensors", "config.json", "preprocessor_config.json", "image"}, errors
    for name, msg in errors.items():
        assert "is a FIFO, not a regular file" in msg and "\n" not in msg, (name, msg)


def test_fifo_shard_is_refused(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_itm", d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pipe.safetensors"}}))
    os.mkfifo(d / "pipe.safetensors")
    out = run_python(expect_error(f"__import__('blip2_jax.weights.hf').weights.hf.load({str(d)!r})"), timeout=120)
    assert out["error"].endswith("pipe.safetensors is a FIFO, not a regular file"), out


# ----------------------------------------------------------------------------------------------
# Memory: rejected before allocation, under an address-space limit
# ----------------------------------------------------------------------------------------------
def big_header(path, entry: str) -> str:
    """A safetensors file whose 94 MiB header repeats `entry` ({i} is the index)."""
    target, parts, size, i = 94 * 2**20, [], 2, 0
    while size < target:
        parts.append(entry.format(i=i))
        size += len(parts[-1]) + 1
        i += 1
    raw = ("{" + ",".join(parts) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return str(path)


@pytest.mark.parametrize("entry", ['"t{i}":{{}}', '"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'],
                         ids=["empty entries", "zero-size entries"])
def test_94_mib_header_stays_small(tmp_path, entry):
    path = big_header(tmp_path / "x.safetensors", entry)
    code = expect_error(f"__import__('blip2_jax.weights.safetensors_io').weights.safetensors_io.read_header({path!r})")
    out = run_python(code, limit_mib=512)
    assert "safetensors header has more than 131072 entries' worth of JSON" in out["error"], out
    assert out["peak_mib"] < 400, out  # the header itself is 94 MiB; parsing it took 2.5 GB


def test_huge_ffn_dim_with_missing_tensors_allocates_nothing(tmp_path):
    """config ffn_dim=10**9 (bounds raised so the config passes) and the fc1 tensors deleted:
    the loader used to fill them with zeros of the config's shape (119 GiB)."""
    d = tmp_path / "model"
    shutil.copytree(GOLDEN / "blip2_opt", d)
    conf = json.loads((d / "config.json").read_text())
    conf["text_config"]["ffn_dim"] = 10**9
    (d / "config.json").write_text(json.dumps(conf))
    from blip2_jax.weights.safetensors_io import LazyStateDict, save_state_dict
    sd = {k: np.array(v) for k, v in LazyStateDict([str(d / "model.safetensors")]).items() if ".fc1." not in k}
    save_state_dict(sd, str(d))
    out = run_python(expect_error(f"__import__('blip2_jax.weights.hf').weights.hf.load({str(d)!r})"),
                     limit_mib=2048, env={"BLIP2_JAX_LIMITS": "max_width=2000000000"})
    assert "language_model.model.decoder.layers.0.fc2.weight: checkpoint shape (32, 64) != expected " \
           "(32, 1000000000)" in out["error"], out


def test_pixel_budget_before_decoding(tmp_path):
    """A 329 KB 13000 x 13000 16-bit PNG: refused from its header, nothing decoded."""
    path = png(tmp_path / "big16.png", 13000, 13000, bit_depth=16)
    assert os.path.getsize(path) < 2**20
    out = run_python(expect_error(f"__import__('blip2_jax.preprocess').preprocess.load_image({path!r})"),
                     limit_mib=512)
    assert out["error"] == f"{path}: 13000x13000 image has 169.0 MP, more than the 64 MP budget " \
                           "(limit max_image_pixels; see BLIP2_JAX_LIMITS)", out


def test_decompression_bomb_is_one_line(tmp_path):
    path = png(tmp_path / "bomb.png", 20000, 20000)
    out = run_python(expect_error(f"__import__('blip2_jax.preprocess').preprocess.load_image({path!r})"),
                     limit_mib=512, env={"BLIP2_JAX_LIMITS": "max_image_pixels=1000000000"})
    assert out["error"].startswith(f"cannot read image {path}: refused as a decompression bomb: "), out


def test_16_bit_image_costs_no_more_than_8_bit(tmp_path):
    """16-bit greyscale goes to 8 bits in row blocks (it took float64 copies of the image):
    preprocessing it peaks at most 1.5x the memory of an 8-bit image of the same size."""
    ramp = (np.arange(6000 * 6000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(6000, 6000)
    Image.fromarray(ramp).save(tmp_path / "16.png", compress_level=1)
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "8.png", compress_level=1)
    del ramp
    code = """
        import numpy as np
        from blip2_jax.preprocess import ImageProcessor
        report(base=0)
        x = ImageProcessor()([{path!r}])
        report(shape=list(x.shape), mean=float(x.mean()))
    """
    base = run_python("import numpy, PIL.Image\nfrom blip2_jax.preprocess import ImageProcessor\nreport()")["peak_mib"]
    eight = run_python(code.format(path=str(tmp_path / "8.png")), limit_mib=2048)
    sixteen = run_python(code.format(path=str(tmp_path / "16.png")), limit_mib=2048)
    assert sixteen["shape"] == [1, 224, 224, 3]
    assert abs(sixteen["mean"] - eight["mean"]) < 0.05  # the same picture, scaled alike
    assert sixteen["peak_mib"] - base <= 1.5 * (eight["peak_mib"] - base), (base, eight, sixteen)


# ----------------------------------------------------------------------------------------------
# The command-line tools
# ----------------------------------------------------------------------------------------------
def cli(*args, env=None):
    run = subprocess.run([sys.executable, "-m", "blip2_jax.generate", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=dict(ENV, **(env or {})))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_one_line_errors(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    ok, models = tmp_path / "ok.png", {}
    for case in ("header", "outside", "config"):
        models[case] = tmp_path / case
        shutil.copytree(GOLDEN / "blip2_opt", models[case])
    (models["header"] / "model.safetensors").write_bytes(struct.pack("<Q", 6) + b"[1, 2]")
    (models["outside"] / "model.safetensors").unlink()
    (models["outside"] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    (models["config"] / "config.json").write_text("[]")
    bomb = png(tmp_path / "bomb.png", 20000, 20000)
    os.mkfifo(tmp_path / "pipe.png")
    cases = [
        ((models["header"], ok), "model.safetensors: corrupt safetensors header: not a JSON object"),
        ((models["outside"], ok), "shard '../../etc/passwd' points outside the model directory"),
        ((models["config"], ok), "config.json must be a JSON object, not a list"),
        ((GOLDEN / "blip2_opt", bomb), "refused as a decompression bomb"),
        ((GOLDEN / "blip2_opt", tmp_path / "pipe.png"), "pipe.png is a FIFO, not a regular file"),
        (("blip2-test/not-cached", ok), "blip2-test/not-cached: no such directory, and the Hugging Face Hub "
                                        "model is not cached in"),
    ]
    for (model, image), expected in cases:
        line = cli("--model", model, "--image", image, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
        assert line.startswith("blip2_jax.generate: error: ") and expected in line, line
