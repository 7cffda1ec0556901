"""The side-by-side demo (``llava.serve.gradio_demo``) served for real on a tiny checkpoint:
through ``gradio_client`` (the documented ``compare`` endpoint and the chat), and in a real
headless Chromium driven by Playwright (Debian's ``chromium``; ``scripts/test.sh`` installs it
where it can, and the browser test is skipped with the reason where it cannot).

Replies are checked against the engine answering alone (itself checked against uncached
greedy decoding in tests/llava/test_serve.py), metrics against each budget's schedule.
"""

import io
import os
import re
import shutil
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from llava.model.builder import load_pretrained_model
from llava.serve.chat import ChatEngine, open_image

gradio = pytest.importorskip("gradio", reason="the demo's tests need the demo extra (pip install -e '.[dev]')")
from gradio_client import Client, handle_file  # noqa: E402

from llava.serve.gradio_demo import build_demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 4
UPLOAD_LIMIT = 60_000  # bytes; the demo's default is 50 MB
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
OUTPUT = os.environ.get("TEST_OUTPUT_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "test-output"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    rng = np.random.RandomState(5)
    Image.fromarray((rng.rand(48, 48, 3) * 255).astype("uint8")).save(folder / "grid.png")
    Image.fromarray((rng.rand(80, 80, 3) * 255).astype("uint8")).save(folder / "huge.png")  # over the test's limit
    (folder / "notes.png").write_text("these are notes, not an image")
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("padding", "x" * (2 * UPLOAD_LIMIT))  # a small picture in a file over the upload limit
    Image.fromarray((rng.rand(48, 48, 3) * 255).astype("uint8")).save(folder / "big.png", pnginfo=info)
    return folder


@pytest.fixture(scope="module")
def served_app(tiny_deep_dir):
    """The demo on 127.0.0.1 (limit 4,000 pixels, so 'huge' is 80 x 80): its address, engine and app."""
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    engine = ChatEngine(tokenizer, model, processor, max_image_pixels=4000)
    demo = build_demo(engine, "adsc", 12, max_new_tokens=NEW, max_upload_bytes=UPLOAD_LIMIT)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine, demo
    demo.close()


@pytest.fixture(scope="module")
def served(served_app):
    return served_app[:2]


def _handlers(demo) -> dict:
    """The app's event handlers by function name (to call them in-process)."""
    return {block_fn.fn.__name__: block_fn.fn for block_fn in demo.fns.values() if block_fn.fn is not None}


def _component(demo, elem_id: str):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def _text(content) -> str:
    """A chat message's text (gradio 6 hands content back as a list of typed parts)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def _reference(engine, path, question, method, budget):
    image = open_image(str(path))
    return engine.answer(image, [], question, engine.setting(method, budget), max_new_tokens=NEW)


def test_compare_endpoint_answers_both_sides_with_their_metrics(served, files):
    url, engine = served
    client = Client(url, verbose=False)
    full, comp, metrics = client.predict(handle_file(str(files / "grid.png")), "What is in the grid?", "adsc", 12,
                                         api_name="/compare")
    assert full == _reference(engine, files / "grid.png", "What is in the grid?", None, None).text
    assert comp == _reference(engine, files / "grid.png", "What is in the grid?", "adsc", 12).text
    for side in ("full", "compressed"):
        assert {"mean_vision_tokens", "kv_mb", "ttft_ms", "tokens_per_s", "tflops", "prefill_kv_mb", "prefill_gflops",
                "answer_gflops"} <= set(metrics[side])
        assert metrics[side]["ttft_ms"] > 0
    assert metrics["full"]["mean_vision_tokens"] == 36 and abs(metrics["compressed"]["mean_vision_tokens"] - 12) <= 1
    assert metrics["compressed"]["kv_mb"] < metrics["full"]["kv_mb"]
    assert metrics["compressed"]["prefill_kv_mb"] < metrics["full"]["prefill_kv_mb"]


def test_compare_refuses_bad_input_with_one_line_and_keeps_serving(served, files):
    url, engine = served
    client = Client(url, verbose=False)
    cases = [(files / "notes.png", "adsc", 12, "not a readable image: notes.png"),
             (files / "huge.png", "adsc", 12, "80 x 80 pixels is over the limit of 4,000 pixels"),
             (files / "grid.png", "pdrop", 2, "prune method pdrop: vision token budget 2.0 is below"),
             (files / "grid.png", "adsc", 12, "fills the context length")]
    for path, method, budget, message in cases:
        question = "word " * 3000 if "context" in message else "What?"
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(path)), question, method, budget, api_name="/compare")
        assert message in str(info.value) and "Traceback" not in str(info.value)
    with pytest.raises(Exception, match="no image: upload one first"):
        client.predict(None, "What?", "adsc", 12, api_name="/compare")  # an empty upload
    full, comp, metrics = client.predict(handle_file(str(files / "grid.png")), "What?", "fastv", 12,
                                         api_name="/compare")
    assert metrics["compressed"]["method"] == "fastv"
    assert full == _reference(engine, files / "grid.png", "What?", None, None).text
    assert comp == _reference(engine, files / "grid.png", "What?", "fastv", 12).text  # itself checked in test_serve


def test_two_concurrent_requests_with_different_budgets_each_get_their_own_schedule(served, files):
    url, engine = served
    results, errors = {}, []

    def ask(budget):
        try:
            client = Client(url, verbose=False)
            for _ in range(2):
                results.setdefault(budget, []).append(client.predict(
                    handle_file(str(files / "grid.png")), "Read the grid.", "adsc", budget, api_name="/compare"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(b,)) for b in (10, 24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for budget, answers in results.items():
        reference = _reference(engine, files / "grid.png", "Read the grid.", "adsc", budget)
        for _, comp, metrics in answers:
            assert abs(metrics["compressed"]["mean_vision_tokens"] - budget) <= 1
            assert metrics["compressed"]["kv_mb"] == reference.metrics.kv_mb and comp == reference.text
    assert engine.model.config.prune_layers == []  # no request wrote the shared config


def test_chat_endpoint_streams_both_panes_draws_the_kept_patches_and_survives_a_bad_upload(served, files):
    url, engine = served
    client = Client(url, verbose=False)
    grid = handle_file(str(files / "grid.png"))
    layers = ", ".join(map(str, engine.model.prune_layers_for("adsc")))
    full_chat, comp_chat, full_m, comp_m, kept, caption, status = client.predict(
        grid, "What is in the grid?", "adsc", 12, "", [], [], api_name="/chat")
    assert status == "done" and full_m.startswith("full — prefill of")
    assert comp_m.startswith(f"adsc @ 12 · layers {layers} — prefill of")
    assert caption == f"kept by the compressed pane's last reply: adsc @ 12 · layers {layers}"
    assert [m["role"] for m in full_chat] == ["user", "assistant"] and len(comp_chat) == 2
    assert _text(comp_chat[1]["content"]) == _reference(engine, files / "grid.png", "What is in the grid?", "adsc", 12).text
    pictures = {12: np.asarray(Image.open(kept))}
    *_, kept_pdrop, caption, _ = client.predict(grid, "What is in the grid?", "pdrop", 20, "2, 5", [], [],
                                                api_name="/chat")
    assert caption.endswith("pdrop @ 20 · layers 2, 5")
    pictures[20] = np.asarray(Image.open(kept_pdrop))
    assert pictures[12].shape != pictures[20].shape or (pictures[12] != pictures[20]).any()
    *_, status = client.predict(handle_file(str(files / "notes.png")), "What?", "adsc", 12, "", [], [], api_name="/chat")
    assert status.startswith("⚠️ not a readable image: notes.png")
    *_, status = client.predict(grid, "What?", "pdrop", 20, "2, x", [], [], api_name="/chat")
    assert status == "⚠️ prune layers '2, x': give comma-separated decoder layers, e.g. 1, 4"
    *_, status = client.predict(grid, "What?", "adsc", 12, "", [], [], api_name="/chat")
    assert status == "done"


def _prefill(line: str) -> tuple[int, float, float]:
    """(text tokens, KV MB, GFLOPs) of a pane's prefill line."""
    found = re.search(r"prefill of (\d+) text tokens \+ image: [\d.]+ vision tokens/layer · KV ([\d.]+) MB · "
                      r"([\d.]+) GFLOPs", line)
    assert found, line
    return int(found[1]), float(found[2]), float(found[3])


def test_in_a_three_turn_chat_the_compressed_panes_prefill_costs_less_than_the_full_ones(served, files):
    """Each pane's first line is its prompt's prefill, the answers apart: the comparison of turn 3
    is not swayed by the answers' lengths (the old lines counted each pane's own answer)."""
    url, _ = served
    client = Client(url, verbose=False)
    grid = handle_file(str(files / "grid.png"))
    full_chat, comp_chat, lines = [], [], []
    for question in ("What is in the grid?", "And the first one?", "How many are there?"):
        full_chat, comp_chat, full_m, comp_m, *_, status = client.predict(
            grid, question, "adsc", 12, "", full_chat, comp_chat, api_name="/chat")
        assert status == "done"
        lines.append((_prefill(full_m.split("\n")[0]), _prefill(comp_m.split("\n")[0])))
    assert len(full_chat) == len(comp_chat) == 6
    (full_tokens_1, _, _), _ = lines[0]
    (full_tokens_3, full_kv, full_gflops), (comp_tokens_3, comp_kv, comp_gflops) = lines[2]
    assert full_tokens_3 > full_tokens_1  # turn 3's prompt carries the earlier turns
    assert comp_kv < full_kv and comp_gflops < full_gflops


def test_an_upload_over_the_limit_is_refused_in_the_status_line_and_the_box_emptied(served_app, files):
    demo_fns = _handlers(served_app[2])
    outputs = demo_fns["new_image"](str(files / "big.png"))
    upload, preview, *_, status, _, _ = outputs
    assert upload is None and preview is None
    assert status.startswith("⚠️ big.png:") and f"over the upload limit of {UPLOAD_LIMIT / 1e6:g} MB" in status
    *_, status, _, _ = demo_fns["new_image"](None)  # the emptied box fires once more: the refusal stays
    assert not isinstance(status, str)


def _upload(page, path) -> None:
    """Upload as a person does: clear the previous file, click the drop zone, pick the file."""
    clear = page.locator("#image-upload button[aria-label=Clear], #image-upload button[title=Clear]")
    if clear.count():
        clear.first.click()
    with page.expect_file_chooser() as chooser:
        page.locator("#image-upload button.upload-container").click()
    chooser.value.set_files(str(path))


def _wait_status(page, text: str) -> None:
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({text!r})")


def _ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    _wait_status(page, "done")


def _wait_picture_other_than(page, src: str | None) -> None:
    """Wait for a new kept-patch picture, and check its pixels differ from the previous one's
    (gradio names every output file anew, so a new address alone proves nothing)."""
    page.wait_for_function(f"(() => {{ const img = document.querySelector('#kept img'); "
                           f"return img && img.src && img.src != {src!r}; }})()")
    new = page.locator("#kept img").get_attribute("src")
    if src:
        before, after = (np.asarray(Image.open(io.BytesIO(page.request.get(u).body())).convert("RGB")) for u in (src, new))
        assert before.shape != after.shape or (before != after).any()


def _chromium_or_skip():
    if not shutil.which(CHROMIUM) and not os.path.isfile(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (scripts/test.sh does as root) or set "
                    "CHROMIUM to a browser's path")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it is in the dev extra)")
    return sync_playwright


def _picture_pixels(page, src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def test_in_a_real_browser_upload_ask_switch_method_and_recover_from_bad_uploads(served, files):
    sync_playwright = _chromium_or_skip()
    url, engine = served
    layers = ", ".join(map(str, engine.model.prune_layers_for("adsc")))
    os.makedirs(OUTPUT, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(url)
        _upload(page, files / "grid.png")
        _wait_status(page, "image ready")
        page.wait_for_function("(() => { const img = document.querySelector('#preview img'); "
                               "return img && img.src && img.naturalWidth > 0; })()")  # the upload is shown
        assert page.locator("#kept-caption").inner_text().strip() == "the whole image (nothing asked yet)"
        _ask(page, "What is in the grid?")
        assert page.locator("#full-metrics").inner_text().startswith("full — prefill of")
        assert page.locator("#compressed-metrics").inner_text().startswith(f"adsc @ 12 · layers {layers} — prefill of")
        assert "answer: " in page.locator("#compressed-metrics").inner_text()
        assert page.locator("#kept-caption").inner_text().strip() == \
            f"kept by the compressed pane's last reply: adsc @ 12 · layers {layers}"
        for pane in ("#full-chat", "#compressed-chat"):
            assert page.locator(f"{pane} [data-testid=bot]").count() >= 1
            assert "What is in the grid?" in page.locator(f"{pane} [data-testid=user]").first.inner_text()
        page.screenshot(path=os.path.join(OUTPUT, "demo-answered.png"), full_page=True)

        answered = page.locator("#kept img").get_attribute("src")
        method = page.locator("#method input")
        method.click()
        method.fill("pool")
        method.press("Enter")
        _wait_status(page, "pool reaches budgets 1–36")
        assert page.locator("#layers textarea, #layers input").first.input_value() == ""
        budget = page.locator("#budget input[type=number]")
        budget.fill("9")
        budget.press("Enter")
        _wait_status(page, "pool @ 9: send to compare")
        # the picture and its caption still describe the reply the metrics describe
        assert page.locator("#kept img").get_attribute("src") == answered
        assert page.locator("#kept-caption").inner_text().strip().endswith(f"adsc @ 12 · layers {layers}")

        _upload(page, files / "notes.png")
        _wait_status(page, "not a readable image: notes.png")
        _upload(page, files / "big.png")
        _wait_status(page, "big.png:")
        assert "over the upload limit" in page.locator("#status").inner_text()
        assert "big.png" not in page.locator("#image-upload").inner_text()  # the box was emptied
        assert "Traceback" not in page.content() and "NETWORK ERROR" not in page.content()
        _upload(page, files / "grid.png")
        _wait_status(page, "image ready")
        _ask(page, "Which digit is first?")
        assert page.locator("#compressed-metrics").inner_text().startswith("pool @ 9 — prefill of")
        assert page.locator("#compressed-chat [data-testid=bot]").count() >= 1
        assert page.locator("#kept-caption").inner_text().strip() == "kept by the compressed pane's last reply: pool @ 9"
        _wait_picture_other_than(page, answered)
        page.screenshot(path=os.path.join(OUTPUT, "demo.png"), full_page=True)
        browser.close()


def test_without_a_model_path_it_serves_the_playground_checkpoint_or_says_how_to_make_one(monkeypatch, tmp_path,
                                                                                           tiny_deep_dir):
    from llava.cli import InputError
    from llava.serve import gradio_demo

    monkeypatch.setattr(gradio_demo, "PLAYGROUND_CHECKPOINT", str(tmp_path / "runs" / "default" / "adsc-1of3"))
    with pytest.raises(InputError, match=r"^no --model-path given .* `bash scripts/quickstart.sh`"):
        gradio_demo.main([])
    monkeypatch.setattr(gradio_demo, "PLAYGROUND_CHECKPOINT", tiny_deep_dir)
    assert gradio_demo.default_model_path() == tiny_deep_dir
    assert gradio_demo.build_parser().parse_args([]).host == "127.0.0.1"


def test_a_model_error_gives_one_line_and_a_log_line_and_the_demo_keeps_serving(served, files, monkeypatch, caplog):
    url, engine = served
    client = Client(url, verbose=False)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "generate", broken)
        with caplog.at_level("ERROR", logger="llava.serve.gradio_demo"):
            *_, status = client.predict(handle_file(str(files / "grid.png")), "What?", "adsc", 12, "", [], [],
                                        api_name="/chat")
    assert status == ("⚠️ the model failed on this request (RuntimeError: CUDA error: an illegal memory access was "
                      "encountered); the demo keeps serving")
    assert any("the model failed" in r.message and r.exc_info for r in caplog.records)
    *_, status = client.predict(handle_file(str(files / "grid.png")), "What?", "adsc", 12, "", [], [], api_name="/chat")
    assert status == "done"


def test_a_port_in_use_ends_in_one_line_naming_the_flag_before_the_model_loads(tiny_deep_dir):
    from llava.cli import UsageExit, run_command
    from llava.serve import gradio_demo

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        loads = []
        original = gradio_demo.load_model_from_args
        gradio_demo.load_model_from_args = lambda args: loads.append(args) or original(args)
        try:
            with pytest.raises(UsageExit) as info:
                run_command(gradio_demo.main, ["--model-path", tiny_deep_dir, "--port", str(port)])
        finally:
            gradio_demo.load_model_from_args = original
    assert info.value.code == 2 and loads == []
    assert str(info.value).startswith(f"error: cannot serve on 127.0.0.1:{port}")
    assert str(info.value).endswith("choose another with --port")


def _scan_reachable(model, method, layers):
    """The whole budgets the model's solver accepts for ``method`` at ``layers``, tried one by one."""
    from adsc_patch import ScheduleError

    accepted = []
    for budget in range(1, model.get_vision_tower().num_patches + 1):
        try:
            model.solve_schedule(budget, layers, method=method)
        except ScheduleError:
            continue
        accepted.append(budget)
    return accepted[0], accepted[-1]


def test_on_a_finetuned_checkpoint_the_demo_starts_at_its_schedule_and_offers_what_each_method_reaches(
        tiny_finetuned_dir, monkeypatch):
    from adsc_patch import PRUNE_METHODS
    from adsc_patch.methods import is_pre_llm

    tokenizer, model, processor, _ = load_pretrained_model(tiny_finetuned_dir, device="cpu")
    engine = ChatEngine(tokenizer, model, processor)
    warmed = []
    monkeypatch.setattr(engine, "warm_up", lambda settings: warmed.extend(settings))
    demo = build_demo(engine, max_new_tokens=NEW)
    method, layers, budget = (_component(demo, name) for name in ("method", "layers", "budget"))
    assert (method.value, layers.value, budget.value) == ("adsc", "1, 4", 12)  # the config records adsc, [1, 4], 12
    assert (budget.minimum, budget.maximum) == _scan_reachable(model, "adsc", [1, 4])
    assert [s.prune_method if s.enabled else "full" for s in warmed] == ["full", "adsc"]
    assert warmed[1].prune_layers == (1, 4) and warmed[1].vision_token_budget == 12

    handlers = _handlers(demo)
    own_layers = {"fastv": "1", "tome": "", "visionzip": "", "pool": "", "visionzip_spread": ""}
    for name in PRUNE_METHODS:
        box, slider, status = handlers["new_method"](name, "1, 4")
        expected_layers = own_layers.get(name, "1, 4")
        assert box["value"] == expected_layers and box["interactive"] == (not is_pre_llm(name))
        layers_list = None if is_pre_llm(name) else [int(x) for x in expected_layers.split(",")]
        low, high = _scan_reachable(model, name, layers_list) if layers_list else _scan_reachable(model, name, None)
        assert (slider["minimum"], slider["maximum"]) == (low, high), name
        assert f"reaches budgets {low}–{high}" in status
    # other layers: the range follows them; a budget below the new floor moves up to it
    _, slider, _ = handlers["new_layers"]("fastv", "5", 6)
    assert (slider["minimum"], slider["maximum"]) == _scan_reachable(model, "fastv", [5])
    assert slider["value"] == slider["minimum"] > 6
    *_, status = handlers["new_layers"]("adsc", "9", 12)
    assert status.startswith("⚠️") and "9" in status  # past the 8 layers: one line
    assert handlers["check_setting"]("pdrop", 3, "1, 4").startswith("⚠️ prune method pdrop: vision token budget 3")
    assert handlers["check_setting"]("pdrop", 20, "1, 4") == "pdrop @ 20 · layers 1, 4: send to compare"


def test_a_playground_checkpoint_gets_a_question_hint_of_its_kind(tmp_path, served_app):
    from llava.serve.gradio_demo import playground_question_hint

    checkpoint = tmp_path / "runs" / "default" / "checkpoints" / "adsc-1of9"
    checkpoint.mkdir(parents=True)
    assert playground_question_hint(str(checkpoint)) is None  # not a playground run: no study_config.json
    (tmp_path / "runs" / "default" / "study_config.json").write_text("{}")
    hint = playground_question_hint(str(checkpoint))
    from playground.digitgrid import TRANSCRIBE_PROMPT

    assert hint.startswith(f"e.g. {TRANSCRIBE_PROMPT}")  # the playground's main task, the one it is trained on
    _, engine, _ = served_app
    demo = build_demo(engine, "adsc", 12, max_new_tokens=NEW, question_hint=hint, warm_up=False)
    assert _component(demo, "question").placeholder == hint
    assert _component(served_app[2], "question").placeholder == "Ask about the image"


def test_the_demos_pruning_flags_are_the_entry_points_own_and_read_into_its_first_setting(tiny_finetuned_dir):
    """The demo takes the pruning flags every entry point takes (``add_spec_flags``): a budget,
    a fraction of the 36 tokens or a ratio (shown as the budget it means) start the compressed
    pane; a request that cannot be one is refused in one line before anything is served."""
    from adsc_patch import ScheduleError
    from llava.cli import InputError
    from llava.model.builder import load_pretrained_model
    from llava.serve.gradio_demo import build_parser, first_setting_from_flags

    _, model, _, _ = load_pretrained_model(tiny_finetuned_dir, device="cpu")
    parse = build_parser().parse_args

    def first(*flags):
        return first_setting_from_flags(parse(["--model-path", tiny_finetuned_dir, *flags]), model)

    assert first() == (None, None, None)  # the checkpoint's own (build_demo's defaults)
    assert first("--vision-token-budget", "14") == (None, 14.0, None)
    assert first("--prune-method", "pdrop", "--budget-fraction", "0.5") == ("pdrop", 18.0, None)
    # a ratio of 0.5 at layers 1 and 4 of 8: 36 -> 18 -> 9, average (36 + 3 * 18 + 4 * 9) / 8
    assert first("--drop-ratio", "0.5", "--prune-layers", "1,4") == (None, (36 + 3 * 18 + 4 * 9) / 8, [1, 4])
    with pytest.raises(InputError, match="--no-pruning"):
        first("--no-pruning")
    with pytest.raises(ScheduleError, match="fastv drops once"):
        first("--prune-method", "fastv", "--prune-layers", "1,4", "--vision-token-budget", "14")
