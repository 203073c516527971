"""The grain pipeline: exact resume through orbax, bad records counted, host sharding, eval
padding, global batches on a mesh."""
import io

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from blip2_jax.data import builders, pipeline
from blip2_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    builders.prepare_dataset("synthetic_shapes/tiny", d)
    return d


def _cfg(data_dir, **kw):
    c = pipeline.default_input_config()
    c.dataset, c.data_dir = "synthetic_shapes/tiny", str(data_dir)
    c.batch_size, c.image_size, c.read_threads, c.read_buffer_size = 8, 32, 2, 8
    c.update(kw)
    return c


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _save(directory, it):
    with ocp.CheckpointManager(directory) as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()


def _restore(directory, it):
    with ocp.CheckpointManager(directory) as mngr:
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))


def test_batch_format(data_dir):
    b = next(pipeline.make_iterator(_cfg(data_dir, text_processor="opt_caption")))
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["image_id"].dtype == np.int32 and b["mask"].all()
    assert b["llm_input_ids"].shape == b["llm_labels"].shape == (8, 32)
    # CLIP-normalised: an 8-bit image maps into [-mean/std, (1-mean)/std]
    assert b["image"].min() >= -1.80 and b["image"].max() <= 2.15


def test_resume_through_orbax_sees_the_same_batches(data_dir, tmp_path):
    cfg = _cfg(data_dir, text_processor="t5_prefix_caption")  # random crops, flips, splits
    it = pipeline.make_iterator(cfg)
    for _ in range(6):
        next(it)
    _save(tmp_path / "ckpt", it)
    expected = [next(it) for _ in range(5)]  # crosses the epoch end (8 batches per epoch)
    fresh = pipeline.make_iterator(cfg)
    _restore(tmp_path / "ckpt", fresh)
    for e in expected:
        _same(next(fresh), e)
    # and a different seed gives different batches
    other = pipeline.make_iterator(_cfg(data_dir, seed=1))
    first = pipeline.make_iterator(cfg)
    assert not np.array_equal(next(other)["image_id"], next(first)["image_id"])


def test_epochs_reshuffle_and_cover_the_data(data_dir):
    it = pipeline.make_iterator(_cfg(data_dir, num_epochs=2))
    ids = [b["image_id"] for b in it]
    assert len(ids) == 16
    e1, e2 = np.concatenate(ids[:8]), np.concatenate(ids[8:])
    assert sorted(e1) == sorted(e2) and len(set(e1)) == 64 and not np.array_equal(e1, e2)


def test_hosts_get_disjoint_shards_and_equal_eval_batches(data_dir):
    per_host = []
    for index in range(3):
        cfg = _cfg(data_dir, split="test", train=False, batch_size=6)  # 16 test scenes
        per_host.append(list(pipeline.make_iterator(cfg, process_index=index, process_count=3)))
    assert [len(b) for b in per_host] == [3, 3, 3]  # ceil(ceil(16/3)/2): same on every host
    ids = [set(np.concatenate([b["image_id"][b["mask"]] for b in host])) for host in per_host]
    assert sum(map(len, ids)) == 16 and len(set.union(*ids)) == 16
    last = per_host[2][-1]
    assert last["mask"].sum() == 1 and last["texts"][1] is None  # padding
    assert per_host[0][0]["texts"][0]  # reference captions on the host side


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_bad_records_are_counted_not_fatal(tmp_path):
    good = _png(np.full((8, 8, 3), 200, np.uint8))
    grey = _png(np.full((8, 8), 100, np.uint8))
    noise = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    truncated = noise[: len(noise) // 2]  # header intact, pixel data cut
    records = [
        {"image": good, "image_id": 0, "captions": [b"A dog."]},
        {"image": b"garbage", "image_id": 1, "captions": [b"x"]},
        {"image": truncated, "image_id": 2, "captions": [b"x"]},
        {"image": grey, "image_id": 3, "captions": [b"a grey one"]},
        {"image": good, "image_id": 4, "captions": [b"...", b""]},  # empty after normalising
        {"image": b"", "image_id": 5, "captions": [b"x"]},
        {"image": good, "image_id": 6, "captions": [b"a cat"]},
    ]
    cfg = _cfg(tmp_path, batch_size=3, image_size=8, num_epochs=2, shuffle=False,
               read_threads=0)
    it = pipeline.make_iterator(cfg, source=records)
    batches = list(it)  # 2 epochs x 3 good records = 2 batches of 3
    assert [b["image_id"].tolist() for b in batches] == [[0, 3, 6], [0, 3, 6]]
    assert it.stats.as_dict() == {"converted_L": 2, "empty_caption": 2, "empty_image": 2,
                                  "truncated_image": 2, "undecodable_image": 2}
    assert it.stats.skipped == 8 and it.stats.converted == 2
    state = it.get_state()
    again = pipeline.make_iterator(cfg, source=records)
    again.set_state(state)
    assert again.stats.skipped == 8  # the counts are part of the saved state


def test_only_broken_records_stop_with_a_clear_error(tmp_path):
    records = [{"image": b"garbage", "image_id": i, "captions": [b"x"]} for i in range(4)]
    cfg = _cfg(tmp_path, batch_size=2, read_threads=0, max_consecutive_skips=50)
    with pytest.raises(RuntimeError, match="50 unusable records in a row"):
        next(pipeline.make_iterator(cfg, source=records))
    vqa_only = [{"image": b"", "image_id": 0, "question": b"q?", "answers": [b"a"]}]
    with pytest.raises(ValueError, match="needs captions"):
        next(pipeline.make_iterator(_cfg(tmp_path, read_threads=0), source=vqa_only))


def test_vqa_processor_on_synthetic_questions(data_dir):
    b = next(pipeline.make_iterator(_cfg(data_dir, text_processor="opt_vqa_prompt",
                                         train=False, split="validation")))
    assert b["question"][0] and b["answers"][0]
    assert b["qformer_input_ids"][0, 0] == 101 and b["qformer_attention_mask"].any(1).all()
    from blip2_jax.data.tokenizers import load_tokenizer
    gpt2 = load_tokenizer("gpt2-offline")
    prompt = gpt2.decode(b["llm_input_ids"][0][b["llm_attention_mask"][0] == 1])
    assert prompt == f"Question: {b['question'][0]} Answer:"  # left-padded generation prompt
    cap = next(pipeline.make_iterator(_cfg(data_dir, text_processor="opt_prompt", train=False,
                                           split="validation", prompt="a photo of")))
    assert gpt2.decode(cap["llm_input_ids"][0][cap["llm_attention_mask"][0] == 1]) == "a photo of"
    assert "qformer_input_ids" not in cap and cap["texts"][0]


def test_make_global_batch_on_the_mesh(data_dir):
    mesh = make_mesh((4, 2, 1))
    local = next(pipeline.make_iterator(_cfg(data_dir, train=False, split="test")))
    glob = pipeline.make_global_batch(local, mesh)
    assert isinstance(glob["image"], jax.Array) and glob["image"].shape == (8, 32, 32, 3)
    assert glob["image"].sharding.spec[0] == ("data", "fsdp")
    assert len(glob["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(glob["image_id"]), local["image_id"])
    assert glob["texts"] is local["texts"]


def test_uint8_images_normalised_on_device(data_dir):
    host = next(pipeline.make_iterator(_cfg(data_dir)))
    raw = next(pipeline.make_iterator(_cfg(data_dir, image_dtype="uint8")))
    assert raw["image"].dtype == np.uint8
    on_device = jax.jit(pipeline.normalize_on_device)(raw["image"])
    np.testing.assert_allclose(np.asarray(on_device), host["image"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_worker_process_gives_the_same_batches(data_dir, train):
    cfg = _cfg(data_dir, text_processor="qformer_caption", train=train, split="validation")
    inline = pipeline.make_iterator(cfg)
    expected = [next(inline) for _ in range(2)]
    cfg.worker_count = 1
    it = pipeline.make_iterator(cfg)
    try:
        _same(next(it), expected[0])
        state = it.get_state()
        _same(next(it), expected[1])
    finally:
        it.close()
    if train:  # a fresh worker pipeline resumes from the saved state
        resumed = pipeline.make_iterator(cfg)
        try:
            resumed.set_state(state)
            _same(next(resumed), expected[1])
        finally:
            resumed.close()


def test_bench_script_runs():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_data.py"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--images", "3", "--sizes", "32", "--skip_pipeline"])
    assert set(out[32]) >= {"train_transform", "eval_transform"} and out[32]["eval_transform"] > 0


class _CountingSource:
    """A source that counts how often each record is read."""

    def __init__(self, source):
        self.source, self.reads = source, {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads[i] = self.reads.get(i, 0) + 1
        return self.source[i]


def test_cache_raw_reads_each_record_once_and_changes_no_batch(data_dir):
    plain = _CountingSource(pipeline.load_source(_cfg(data_dir)))
    cached = _CountingSource(pipeline.load_source(_cfg(data_dir)))
    want = list(pipeline.make_iterator(_cfg(data_dir, num_epochs=3), source=plain))
    got = list(pipeline.make_iterator(_cfg(data_dir, num_epochs=3, cache_raw=True), source=cached))
    assert len(got) == len(want) == 24  # 3 epochs of 64 scenes in batches of 8
    for a, b in zip(got, want):
        _same(a, b)
    assert set(plain.reads.values()) == {3} and set(cached.reads.values()) == {1}
    assert len(cached.reads) == 64
