"""The web demo (`python -m blip2_jax.demo`) in a real browser: Chromium driven by Playwright
against the tiny golden checkpoint. The page must show exactly what `blip2_jax.load(...).generate`
returns for the same image, prompt and settings (a caption, two chat turns whose prompt carries
the first turn, two users at once); a text file renamed .png, a huge image and an empty question
must show a message, never a traceback. BLIP2_JAX_DEMO_SCREENSHOT=path saves a screenshot."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from PIL import Image

from blip2_jax.cli import demo as demo_cli
from tests.conftest import GOLDEN, ROOT

skimage_data = pytest.importorskip("skimage.data")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ENV = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), JAX_PLATFORMS="cpu",
           PYTHONUNBUFFERED="1")
WAIT_MS = 240_000  # a first call compiles (minutes on a loaded 2-core machine)


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "blip2_jax.demo", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=300)


# ------------------------------------------------------------------------------ without a browser
def test_chat_prompt_carries_the_conversation():
    assert demo_cli.chat_prompt([], "what is it?") == "Question: what is it? Answer:"
    assert (demo_cli.chat_prompt([("q1", "a1"), ("q2", "a2")], "q3")
            == "Question: q1 Answer: a1. Question: q2 Answer: a2. Question: q3 Answer:")


def test_first_call_with_new_settings_shows_progress():
    shown, runs = [], []
    d = demo_cli.Demo(model=None)
    for key in ("a", "a", "b"):
        d.warm(key, lambda: runs.append(1), lambda frac, desc: shown.append(desc))
    assert len(runs) == 2 and len(shown) == 2 and "Compiling" in shown[0]


def test_batched_requests_group_by_settings():
    assert dict(demo_cli.group_rows(["x", "y", "x"])) == {"x": [0, 2], "y": [1]}


@pytest.mark.parametrize("args,message", [
    (["--model", GOLDEN / "blip2_opt", "--quantize", "int7"], "unknown quantization mode 'int7'"),
    (["--model", "/no/such/model/dir"], "/no/such/model/dir"),
])
def test_bad_command_line_is_one_line(args, message):
    run = run_demo(*args)
    err = run.stderr.strip()
    assert run.returncode == 2 and err.startswith("blip2_jax.demo: error: ") and message in err, run.stderr
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_search_tab_ranks_like_retrieve(photos):
    import blip2_jax
    model = blip2_jax.load(GOLDEN / "blip2_itm")
    d = demo_cli.Demo(model=None, retrieval=model, gallery=[str(p) for p in photos[2:]])
    uploads = [str(p) for p in photos[:2]]
    got = d.search(uploads, True, "a rocket", k=3, top=3, progress=lambda *a, **k: None)
    paths = uploads + [str(p) for p in photos[2:]]
    want = model.retrieve(paths, ["a rocket"], k=3, top=3)[0]
    assert [c for _, c in got] == [f"{s:.3f}  {os.path.basename(paths[i])}" for i, s in want]


@pytest.mark.slow
def test_batched_requests_get_what_each_would_get_alone(photos, reference):
    d = demo_cli.Demo(reference)
    rows = [("beam search", 3, 8), ("beam search", 2, 6), ("beam search", 3, 8)]  # rows 0 and 2: one call
    images = [str(photos[i]) for i in (0, 1, 2)]
    settings = [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [1.0] * 3, [1.0] * 3,
                [0.9] * 3, [1.0] * 3, [0] * 3]
    [captions] = d.caption_batch(images, *settings)
    want = [reference.generate([im], **demo_cli.caption_options(*s))[0] for im, s in zip(images, zip(*settings))]
    assert captions == want
    history = [[], [("what is it?", "a cat")]]
    messages, histories, answers, prompts, cleared = d.chat_batch(images[:2], ["what is it?", "why?"], history,
                                                                  [3, 3], [10, 10])
    assert prompts == ["Question: what is it? Answer:", "Question: what is it? Answer: a cat. Question: why? Answer:"]
    assert answers == [reference.generate([im], [p], num_beams=3, max_new_tokens=10)[0]
                       for im, p in zip(images, prompts)]
    assert histories[1] == [("what is it?", "a cat"), ("why?", answers[1])] and cleared == ["", ""]
    assert messages[1][-1] == {"role": "assistant", "content": answers[1]}


# ------------------------------------------------------------------------------ in the browser
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        paths.append(folder / f"{name}.png")
        Image.fromarray(getattr(skimage_data, name)()).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo on a free port; yields its URL."""
    import portpicker
    port = portpicker.pick_unused_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "blip2_jax.demo", "--model", str(GOLDEN / "blip2_opt"),
                                 "--port", str(port)], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"the demo exited:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, f"the demo did not start:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (tools/env.sh installs it when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 860})
        yield context
        context.close()


@pytest.fixture(scope="module")
def reference():
    import blip2_jax
    return blip2_jax.load(GOLDEN / "blip2_opt")


def caption_settings():
    d = demo_cli.DEFAULTS
    return demo_cli.caption_options("beam search", d["num_beams"], d["max_new_tokens"], d["length_penalty"],
                                    d["repetition_penalty"], d["top_p"], d["temperature"], d["seed"])


def chat_settings():
    return {"num_beams": demo_cli.DEFAULTS["chat_num_beams"], "max_new_tokens": demo_cli.DEFAULTS["chat_max_new_tokens"]}


def open_page(browser, url, image=None):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#image-input")
    if image is not None:
        upload(page, image)
    return page


def upload(page, path):
    page.locator("#image-input input[type=file]").set_input_files(str(path))
    page.wait_for_timeout(500)


def wait_text(page, elem_id, previous=""):
    """The value of textbox `elem_id` once it is set (and differs from `previous`)."""
    box = page.locator(f"#{elem_id} textarea")
    page.wait_for_function("([sel, prev]) => { const v = document.querySelector(sel)?.value; return v && v !== prev; }",
                           arg=[f"#{elem_id} textarea", previous], timeout=WAIT_MS)
    return box.input_value()


def expect_error(page, text):
    """A message in the page that contains `text`; no traceback anywhere."""
    page.get_by_text(text).first.wait_for(timeout=60_000)
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body


@pytest.mark.slow
def test_caption_and_chat_show_what_generate_returns(server, browser, photos, reference):
    page = open_page(browser, server, photos[0])
    page.click("#caption-button")
    assert wait_text(page, "caption-text") == reference.generate([str(photos[0])], **caption_settings())[0]

    page.get_by_role("tab", name="Chat").click()
    answers = []
    for q in ("what is in the picture?", "where is she?"):
        page.locator("#chat-question textarea").fill(q)
        page.click("#chat-button")
        answers.append(wait_text(page, "chat-answer", answers[-1] if answers else ""))
    p1 = "Question: what is in the picture? Answer:"
    p2 = f"Question: what is in the picture? Answer: {answers[0]}. Question: where is she? Answer:"
    assert answers == [reference.generate([str(photos[0])], [p], **chat_settings())[0] for p in (p1, p2)]
    page.get_by_text("Prompt sent to the model, settings").click()
    assert page.locator("#chat-prompt textarea").input_value() == p2
    for a in answers:
        assert page.locator("#chatbot").get_by_text(a, exact=True).count() >= 1
    if os.environ.get("BLIP2_JAX_DEMO_SCREENSHOT"):
        page.get_by_text("Prompt sent to the model, settings").click()
        page.screenshot(path=os.environ["BLIP2_JAX_DEMO_SCREENSHOT"])
    page.close()


@pytest.mark.slow
def test_two_users_at_once(server, browser, photos, reference):
    pages = [open_page(browser, server, p) for p in photos[1:3]]
    for page in pages:
        page.click("#caption-button")
    got = [wait_text(page, "caption-text") for page in pages]
    assert got == [reference.generate([str(p)], **caption_settings())[0] for p in photos[1:3]]
    for page in pages:
        page.close()


@pytest.mark.slow
def test_bad_uploads_and_questions_show_a_message(server, browser, photos, tmp_path):
    page = open_page(browser, server)
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture")
    upload(page, fake)
    expect_error(page, "notes.png is not an image we can read")

    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 7000)).save(huge)  # 56 MP: a small file that decodes to a huge image
    page.reload()
    page.wait_for_selector("#image-input")
    upload(page, huge)
    expect_error(page, "huge.png is too large")

    page.reload()
    page.wait_for_selector("#image-input")
    upload(page, photos[0])
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-button")
    expect_error(page, "Type a question first.")
    page.close()
