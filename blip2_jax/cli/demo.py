"""A web demo of a BLIP-2 checkpoint (Gradio), on CPU, GPU or TPU.

    python -m blip2_jax.demo --model DIR_OR_HUB_ID [--retrieval-model DIR] [--gallery DIR]
        [--port 7860] [--host 127.0.0.1] [--dtype bfloat16] [--quantize int8]

Tabs about one uploaded image: caption (beam search or sampling), chat (each question goes to the
model with the earlier turns in the prompt, "Question: q1 Answer: a1. Question: q2 Answer:", as in
the paper's instructed generation, Fig. 4), rank answers (log-likelihood of candidate texts).
Search: text -> image over uploaded images or the --gallery folder (ITC top-k, then ITM
re-ranking; needs --retrieval-model). Requests wait in Gradio's queue; caption and chat requests
that are waiting together run as one batch per set of equal settings. A call that compiles
(new settings or prompt length) shows it as progress. Bad input is a message in the page.
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
from collections.abc import Sequence

from blip2_jax.cli import common

PROG = "blip2_jax.demo"
MAX_BATCH = 8                       # requests per batched caption / chat call
MAX_UPLOAD = "40mb"
DEFAULTS = {"num_beams": 3, "max_new_tokens": 20, "length_penalty": 1.0, "repetition_penalty": 1.0,
            "top_p": 0.9, "temperature": 1.0, "seed": 0, "chat_num_beams": 3, "chat_max_new_tokens": 10}
RANK_PROMPT = "Question: what is in the image? Answer:"


# ------------------------------------------------------------------------------ pure helpers
def chat_prompt(history: Sequence[tuple[str, str]], question: str) -> str:
    """Earlier (question, answer) turns and a new question -> the prompt (Fig. 4's format)."""
    turns = [f"Question: {q} Answer: {a}." for q, a in history]
    return " ".join(turns + [f"Question: {question} Answer:"])


def caption_options(decoding: str, num_beams, max_new_tokens, length_penalty, repetition_penalty, top_p,
                    temperature, seed) -> dict:
    """The caption tab's settings -> generation options (+ seed)."""
    opts = {"max_new_tokens": int(max_new_tokens), "repetition_penalty": float(repetition_penalty)}
    if decoding == "sampling":
        return {**opts, "do_sample": True, "top_p": float(top_p), "temperature": float(temperature),
                "seed": int(seed)}
    return {**opts, "num_beams": int(num_beams), "length_penalty": float(length_penalty)}


def log_batch(what: str, requests: int, calls: int) -> None:
    if requests > 1:
        print(f"{PROG}: {what}: {requests} requests in {calls} model call(s)", file=sys.stderr, flush=True)


def group_rows(keys: Sequence) -> dict:
    """Row indices by key (requests with equal settings share one model call)."""
    groups = collections.defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    return groups


# ------------------------------------------------------------------------------ the model side
class Demo:
    """The handlers behind the page: `blip2_jax.load` models (one `serving.Predictor` each)."""

    def __init__(self, model, retrieval=None, gallery: Sequence[str] = (), max_pixels: int | None = None):
        from blip2_jax import annotation
        self.model, self.retrieval, self.gallery = model, retrieval, list(gallery)
        self.max_pixels = max_pixels or annotation.MAX_IMAGE_PIXELS
        self.compiled: set = set()
        self._features: dict = {}
        self.lock = threading.Lock()  # one model call at a time (checks run beside them)

    def check_image(self, path: str | None) -> str:
        """An uploaded file -> its path, if it is an image we accept (InputError otherwise)."""
        from blip2_jax import annotation
        from blip2_jax.data.transforms import BadImage
        from blip2_jax.preprocess import InputError
        if not path:
            raise InputError("Upload an image first.")
        try:
            annotation.read_image(path, self.max_pixels)
        except BadImage as e:
            name = os.path.basename(path)
            raise InputError({"too_large": f"{name} is too large: {str(e).partition(': ')[2]}",
                              "empty_image": f"{name} is empty."}.get(e.reason, f"{name} is not an image we can read "
                                                                                 "(PNG, JPEG, WebP, GIF, BMP, TIFF).")) from None
        return path

    def warm(self, key, run, progress) -> None:
        """Runs `run()` once under a progress message when `key` (settings, shapes) is new."""
        if key in self.compiled:
            return
        progress(0.1, desc="Compiling the model for these settings (first call only; later calls reuse it)")
        with self.lock:
            run()
        self.compiled.add(key)

    # -- caption
    def prepare_caption(self, image, *settings, progress):
        self.check_image(image)
        opts = caption_options(*settings)
        self.warm(("caption", tuple(sorted(opts.items()))), lambda: self.model.generate([image], **opts), progress)

    def caption_batch(self, images, *settings):
        """Batched: lists in, one list of captions out."""
        opts = [caption_options(*s) for s in zip(*settings)]
        out = [""] * len(images)
        groups = group_rows([tuple(sorted(o.items())) for o in opts])
        log_batch("caption", len(images), len(groups))
        with self.lock:
            for key, rows in groups.items():
                for i, text in zip(rows, self.model.generate([images[i] for i in rows], **dict(key))):
                    out[i] = text
        return [out]

    # -- chat
    def chat_prompt_that_fits(self, history, question: str, max_new_tokens: int) -> str:
        """The chat prompt, without the oldest turns if the language model has no room for them."""
        from blip2_jax.preprocess import InputError
        p = self.model.predictor
        extra = max_new_tokens - 1 if p.llm_kind == "opt" else 0
        limit = p.max_prompt_tokens(extra)
        for start in range(len(history) + 1):
            prompt = chat_prompt(history[start:], question)
            if limit is None or len(p.prompt_tokens(prompt)) <= limit:
                return prompt
        raise InputError("The question is too long for the model.")

    def prepare_chat(self, image, question, history, beams, max_new, *, progress):
        from blip2_jax.preprocess import InputError
        self.check_image(image)
        if not (question or "").strip():
            raise InputError("Type a question first.")
        prompt = self.chat_prompt_that_fits(history or [], question.strip(), int(max_new))
        bucket = self.model.predictor.bucket(len(self.model.predictor.prompt_tokens(prompt)))
        opts = {"num_beams": int(beams), "max_new_tokens": int(max_new)}
        self.warm(("chat", bucket, tuple(sorted(opts.items()))),
                  lambda: self.model.generate([image], [prompt], **opts), progress)

    def chat_batch(self, images, questions, histories, beams, max_new):
        """Batched: -> (chatbot messages, histories, answers, prompts, cleared questions), each a list."""
        n = len(images)
        histories = [list(h or []) for h in histories]
        prompts = [self.chat_prompt_that_fits(histories[i], questions[i].strip(), int(max_new[i])) for i in range(n)]
        answers = [""] * n
        keys = [(int(beams[i]), int(max_new[i]), self.model.predictor.bucket(
            len(self.model.predictor.prompt_tokens(prompts[i])))) for i in range(n)]
        groups = group_rows(keys)
        log_batch("chat", n, len(groups))
        with self.lock:
            for (b, m, _), rows in groups.items():
                texts = self.model.generate([images[i] for i in rows], [prompts[i] for i in rows], num_beams=b,
                                            max_new_tokens=m)
                for i, t in zip(rows, texts):
                    answers[i] = t
        for i in range(n):
            histories[i].append((questions[i].strip(), answers[i]))
        messages = [[{"role": r, "content": c} for q, a in h for r, c in (("user", q), ("assistant", a))]
                    for h in histories]
        return [messages, histories, answers, prompts, [""] * n]

    # -- rank
    def rank(self, image, prompt, candidates, progress):
        from blip2_jax.preprocess import InputError
        self.check_image(image)
        texts = [t.strip() for t in (candidates or "").splitlines() if t.strip()]
        if not texts:
            raise InputError("Give candidate answers, one per line.")
        key = ("score", len(texts))
        if key not in self.compiled:
            progress(0.1, desc="Compiling the model for these settings (first call only; later calls reuse it)")
        with self.lock:
            ll, counts = self.model.score([image], (prompt or "").strip() or None, texts, return_num_tokens=True)
        self.compiled.add(key)
        order = sorted(range(len(texts)), key=lambda j: -float(ll[j]))
        return [[texts[j], round(float(ll[j]), 4), int(counts[j])] for j in order]

    # -- search
    def search(self, files, use_gallery: bool, query: str, k: int, top: int, progress):
        from PIL import Image

        from blip2_jax.preprocess import InputError
        if self.retrieval is None:
            raise InputError("Search needs a retrieval checkpoint: start the demo with --retrieval-model DIR.")
        if not (query or "").strip():
            raise InputError("Type what to search for.")
        paths = [self.check_image(getattr(f, "name", f)) for f in (files or [])]
        paths += self.gallery if use_gallery else []
        if not paths:
            raise InputError("Upload images to search, or tick the server's gallery.")
        key = tuple(paths)
        with self.lock:
            if key not in self._features:
                progress(0.1, desc=f"Computing image features of {len(paths)} images (compiles on the first call)")
                self._features = {key: self.retrieval.image_features(paths)}  # the last set only
            hits = self.retrieval.retrieve(paths, [query.strip()], k=int(k), top=int(top),
                                           features=self._features[key])[0]
        out = []
        for i, score in hits:
            im = Image.open(paths[i])
            im.thumbnail((384, 384))
            out.append((im.convert("RGB"), f"{score:.3f}  {os.path.basename(paths[i])}"))
        return out


def page_errors(fn):
    """Bad input -> a message in the page (gr.Error), never a traceback."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import gradio as gr

        from blip2_jax.preprocess import InputError
        try:
            return fn(*args, **kwargs)
        except (InputError, ValueError) as e:
            raise gr.Error(" ".join(str(e).split()), print_exception=False) from None
    return wrapped


# ------------------------------------------------------------------------------ the page
def image_input(**kwargs):
    """gr.Image whose upload check is ours: a file that is not an image is a message. (Its
    `preprocess` is wrapped on the instance: a gr.Image subclass would make Gradio write a .pyi
    stub next to this file.)"""
    import gradio as gr
    from PIL import Image, UnidentifiedImageError

    component = gr.Image(**kwargs)
    preprocess = component.preprocess

    def checked(payload):
        name = getattr(payload, "orig_name", None) or "the file"
        try:
            return preprocess(payload)
        except Image.DecompressionBombError:
            raise gr.Error(f"{name} is too large.", print_exception=False) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise gr.Error(f"{name} is not an image we can read (PNG, JPEG, WebP, GIF, BMP, TIFF).",
                           print_exception=False) from None

    component.preprocess = checked
    return component


def build_app(demo: Demo, title: str):
    import gradio as gr

    d = DEFAULTS
    model_calls = dict(concurrency_id="model", concurrency_limit=1)
    checks = dict(concurrency_limit=None)  # input checks (and a first call's compile, under the lock)
    with gr.Blocks(title="BLIP-2 demo") as app:
        gr.Markdown(f"## BLIP-2 · {title}")
        with gr.Tabs():
            with gr.Tab("Ask about an image"):
                with gr.Row():
                    with gr.Column(scale=2):
                        image = image_input(type="filepath", label="Image", sources=["upload", "clipboard"],
                                           elem_id="image-input", height=380)
                    with gr.Column(scale=3):
                        with gr.Tab("Caption"):
                            decoding = gr.Radio(["beam search", "sampling"], value="beam search", label="Decoding")
                            with gr.Accordion("Settings", open=False):
                                with gr.Row():
                                    beams = gr.Slider(1, 8, d["num_beams"], step=1, label="Beams")
                                    max_new = gr.Slider(1, 60, d["max_new_tokens"], step=1, label="Max new tokens")
                                    lp = gr.Slider(-2, 2, d["length_penalty"], step=0.1, label="Length penalty")
                                with gr.Row():
                                    rp = gr.Slider(1, 2, d["repetition_penalty"], step=0.05, label="Repetition penalty")
                                    top_p = gr.Slider(0.05, 1, d["top_p"], step=0.05, label="Top-p (sampling)")
                                    temp = gr.Slider(0.1, 2, d["temperature"], step=0.05, label="Temperature (sampling)")
                                    seed = gr.Number(d["seed"], precision=0, label="Seed (sampling)")
                            caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-button")
                            caption = gr.Textbox(label="Caption", elem_id="caption-text", interactive=False)
                        with gr.Tab("Chat"):
                            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", render_markdown=False,
                                                 height=260)
                            history = gr.State([])
                            with gr.Row():
                                question = gr.Textbox(label="Question", elem_id="chat-question", scale=4,
                                                      placeholder="What is in the picture?")
                                ask_btn = gr.Button("Ask", variant="primary", elem_id="chat-button", scale=1)
                            answer = gr.Textbox(label="Answer", elem_id="chat-answer", interactive=False)
                            with gr.Accordion("Prompt sent to the model, settings", open=False):
                                prompt_used = gr.Textbox(label="Prompt", elem_id="chat-prompt", interactive=False)
                                with gr.Row():
                                    chat_beams = gr.Slider(1, 8, d["chat_num_beams"], step=1, label="Beams")
                                    chat_max = gr.Slider(1, 40, d["chat_max_new_tokens"], step=1,
                                                         label="Max new tokens")
                            clear_btn = gr.Button("New conversation", size="sm")
                        with gr.Tab("Rank answers"):
                            rank_prompt = gr.Textbox(RANK_PROMPT, label="Prompt", elem_id="rank-prompt")
                            candidates = gr.Textbox(label="Candidate answers (one per line)", lines=4,
                                                    elem_id="rank-candidates", value="a cat\na dog\na person")
                            rank_btn = gr.Button("Rank", variant="primary", elem_id="rank-button")
                            ranking = gr.Dataframe(headers=["answer", "log-likelihood", "tokens"],
                                                   elem_id="rank-table", interactive=False)
            with gr.Tab("Search images"):
                if demo.retrieval is None:
                    gr.Markdown("Start the demo with `--retrieval-model DIR` (a Blip2ForImageTextRetrieval "
                                "checkpoint) to search images by text.")
                with gr.Row():
                    with gr.Column(scale=2):
                        files = gr.File(file_count="multiple", file_types=["image"], label="Images to search")
                        use_gallery = gr.Checkbox(bool(demo.gallery), label=f"Search the server's gallery "
                                                  f"({len(demo.gallery)} images)", interactive=bool(demo.gallery))
                        query = gr.Textbox(label="Text query", elem_id="search-query")
                        with gr.Row():
                            k = gr.Slider(1, 256, 128, step=1, label="ITC candidates re-ranked by ITM (k)")
                            top = gr.Slider(1, 24, 6, step=1, label="Results")
                        search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                    with gr.Column(scale=3):
                        results = gr.Gallery(label="Best matches (ITM + ITC score)", columns=3, elem_id="search-results")

        settings = [decoding, beams, max_new, lp, rp, top_p, temp, seed]
        image.upload(page_errors(lambda path: demo.check_image(path) and None), image, None)
        image.change(lambda: ([], [], "", ""), None, [chatbot, history, answer, prompt_used], queue=False)
        clear_btn.click(lambda: ([], [], "", ""), None, [chatbot, history, answer, prompt_used], queue=False)

        def prepare_caption(image, *s, progress=gr.Progress()):
            demo.prepare_caption(image, *s, progress=progress)
        caption_btn.click(page_errors(prepare_caption), [image, *settings], None, show_progress_on=[caption],
                          **checks).success(
            page_errors(demo.caption_batch), [image, *settings], [caption], batch=True, max_batch_size=MAX_BATCH,
            **model_calls)

        def prepare_chat(image, q, h, b, m, progress=gr.Progress()):
            demo.prepare_chat(image, q, h, b, m, progress=progress)
        chat_in = [image, question, history, chat_beams, chat_max]
        for trigger in (ask_btn.click, question.submit):
            trigger(page_errors(prepare_chat), chat_in, None, show_progress_on=[answer], **checks).success(
                page_errors(demo.chat_batch), chat_in, [chatbot, history, answer, prompt_used, question],
                batch=True, max_batch_size=MAX_BATCH, **model_calls)

        def rank(image, p, c, progress=gr.Progress()):
            return demo.rank(image, p, c, progress)
        rank_btn.click(page_errors(rank), [image, rank_prompt, candidates], [ranking], **model_calls)

        def search(f, g, q, kk, t, progress=gr.Progress()):
            return demo.search(f, g, q, kk, t, progress)
        search_btn.click(page_errors(search), [files, use_gallery, query, k, top], [results], **model_calls)
    return app


# ------------------------------------------------------------------------------ command line
def build_parser():
    p = common.OneLineParser(prog=PROG, description="A web demo of a BLIP-2 checkpoint (Gradio).")
    p.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="a captioning / VQA checkpoint")
    p.add_argument("--retrieval-model", "--retrieval_model", dest="retrieval_model", metavar="DIR_OR_HUB_ID",
                   help="a retrieval checkpoint (Blip2ForImageTextRetrieval) for the search tab")
    p.add_argument("--gallery", metavar="DIR", help="a server folder of images the search tab can search")
    p.add_argument("--dtype", default="float32", choices=common.DTYPES, help="frozen towers' dtype")
    common.add_quantize(p)
    common.add_cores(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=common.positive_int, default=7860)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        model_dir, retrieval_dir = args.model, args.retrieval_model  # directories or Hub ids (`load`)
        gallery = []
        if args.gallery:
            from blip2_jax.cli.retrieve import gallery as list_gallery
            gallery = list_gallery(args.gallery)
        import jax

        from blip2_jax import cores, inference
        t0 = time.perf_counter()
        mesh = cores.mesh(args.cores)
        model = inference.load(model_dir, dtype=args.dtype, quantize=args.quantize, mesh=mesh)
        model.predictor.require(model.can_generate, "the demo's caption and chat", model_dir)
        retrieval = inference.load(retrieval_dir, dtype=args.dtype, quantize=args.quantize,
                                   mesh=mesh) if retrieval_dir else None
        if retrieval is not None:
            retrieval.predictor.require(retrieval.can_match, "search", retrieval_dir)
        dev = jax.devices()
        title = (f"{os.path.basename(os.path.normpath(model_dir))} on {len(dev)} {dev[0].platform.upper()} "
                 f"device(s), {args.dtype}" + (f", {args.quantize}" if args.quantize else ""))
        print(f"{PROG}: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        app = build_app(Demo(model, retrieval, gallery), title)
        app.queue(default_concurrency_limit=1, max_size=64).launch(
            server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD, show_error=False,
            quiet=False, footer_links=[])

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
