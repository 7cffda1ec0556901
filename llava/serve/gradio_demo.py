"""Side-by-side web demo: the same image and question to the full and the compressed model.

``python -m llava.serve.gradio_demo [--model-path P] [--model-base B] [--load-4bit]
[--prune-method adsc] [--vision-token-budget 192] [--host 127.0.0.1] [--port 7860]``

One model in memory serves both panes; each call carries its own pruning setting
(``ChatEngine.setting`` -> ``model.pruned_as``), so concurrent requests never share a
schedule. Under each reply: time to first token, tokens/s, mean vision tokens per layer,
KV-cache MB read off the call's cache and FLOPs from the profiler; beside them the patches
that survive each stage (or the merge groups of a pre-LLM method), drawn from the call's
``PruningTrace``. Bad input (no image, a non-image, a huge image, an empty question, a
prompt over the context length, an unreachable budget) and model errors give one line in
the status box and a log line with the cause; the demo keeps serving.

Scripts call ``api_name="compare"``: (image file, question, method, budget) -> (full answer,
compressed answer, metrics JSON ``{"full": {...}, "compressed": {...}}`` with
``mean_vision_tokens``, ``kv_mb``, ``ttft_ms``, ...), e.g. with ``gradio_client``::

    Client("http://127.0.0.1:7860").predict(handle_file("img.png"), "What is shown?", "adsc", 192,
                                            api_name="/compare")
"""

from __future__ import annotations

import argparse
import socket
import glob
import logging
import os

from adsc_patch import PRUNE_METHODS, ScheduleError

from ..cli import InputError, MissingDependencyError, add_debug_arg, fail, run_command
from ..eval.inference import add_model_args, load_model_from_args
from .chat import MAX_IMAGE_PIXELS, ChatEngine, open_image
from .picture import kept_patches_picture

logger = logging.getLogger("llava.serve.gradio_demo")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYGROUND_RUN = os.path.join(ROOT, "playground", "runs", "default")
PLAYGROUND_CHECKPOINT = os.path.join(PLAYGROUND_RUN, "checkpoints", "adsc-1of3")


def default_model_path() -> str:
    """The playground's fine-tuned ADSC checkpoint; ``InputError`` saying how to make one."""
    if os.path.isfile(os.path.join(PLAYGROUND_CHECKPOINT, "config.json")):
        return PLAYGROUND_CHECKPOINT
    raise InputError("no --model-path given and no playground run at playground/runs/default: make one with "
                     "`bash scripts/quickstart.sh` (about 25 minutes on a CPU) or pass --model-path")


def playground_examples(limit: int = 3) -> list[str]:
    """A few DigitGrid evaluation images of the playground, if its data exists."""
    return sorted(glob.glob(os.path.join(ROOT, "playground", "data", "eval", "digitgrid", "images", "eval_*.png")))[:limit]


def _problem(error: BaseException) -> str:
    """The one line shown for a failed request (the cause goes to the log)."""
    if isinstance(error, (InputError, ScheduleError)):
        logger.warning("request refused: %s", error)
        return f"⚠️ {error}"
    logger.exception("the model failed on a request")
    return f"⚠️ the model failed on this request ({type(error).__name__}: {error}); the demo keeps serving"


def build_demo(engine: ChatEngine, method: str = "adsc", budget: float | None = None,
               examples: list[str] | None = None, max_new_tokens: int = 64):
    """The gradio ``Blocks`` app over ``engine`` (``launch`` it, or test it in-process)."""
    import gradio as gr

    num_patches, layers = engine.num_patches, engine.model.config.num_hidden_layers
    side = engine.model.get_vision_tower().num_patches_per_side
    budget = budget if budget is not None else max(1, round(num_patches / 3))

    def picture(image, trace):
        return kept_patches_picture(image, trace, side, layers)

    def stream_both(image_path, question, method, budget, full_history, comp_history, full_msgs, comp_msgs):
        """Generator of (full chat, compressed chat, full metrics, compressed metrics, picture,
        status, full history, compressed history) updates."""
        full_msgs, comp_msgs = list(full_msgs or []), list(comp_msgs or [])
        keep = (gr.update(), gr.update(), gr.update(), gr.update(), gr.update())
        try:
            image = open_image(image_path, engine.max_image_pixels)
            full_setting, comp_setting = engine.setting(None, None), engine.setting(method, budget)
            engine.encode(image, full_history or [], question or "", max_new_tokens)  # refuse before any output
        except Exception as error:  # noqa: BLE001 - every failure becomes one status line
            yield (*keep, _problem(error), full_history, comp_history)
            return
        question = question.strip()
        replies = {}
        try:
            for pane, setting, history, msgs in (("full", full_setting, full_history, full_msgs),
                                                 ("compressed", comp_setting, comp_history, comp_msgs)):
                msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
                for item in engine.stream(image, history or [], question, setting, max_new_tokens=max_new_tokens):
                    if isinstance(item, str):
                        msgs[-1] = {"role": "assistant", "content": item}
                    else:
                        replies[pane] = item
                        msgs[-1] = {"role": "assistant", "content": item.text}
                    yield (full_msgs, comp_msgs,
                           replies["full"].metrics.line() if "full" in replies else gr.update(),
                           replies["compressed"].metrics.line() if "compressed" in replies else gr.update(),
                           gr.update(), f"answering ({pane})…", full_history, comp_history)
        except Exception as error:  # noqa: BLE001
            yield (*keep, _problem(error), full_history, comp_history)
            return
        yield (full_msgs, comp_msgs, replies["full"].metrics.line(), replies["compressed"].metrics.line(),
               picture(image, replies["compressed"].trace), "done", replies["full"].history,
               replies["compressed"].history)

    def redraw(image_path, question, method, budget, comp_history):
        """A new method or budget: one prefill under it (no answer) for its kept-patch picture."""
        if not image_path:
            return gr.update(), ""
        try:
            image = open_image(image_path, engine.max_image_pixels)
            trace = engine.trace(image, comp_history or [], (question or "").strip() or "Describe the image.",
                                 engine.setting(method, budget))
        except Exception as error:  # noqa: BLE001
            return gr.update(), _problem(error)
        return picture(image, trace), f"{method} @ {budget:g}: kept patches shown"

    def new_image(image_path):
        """A new upload starts a new chat; a bad one says why."""
        empty = ([], [], "", "", None, [], [])
        if not image_path:
            return (*empty[:4], None, "upload an image", [], [])
        try:
            image = open_image(image_path, engine.max_image_pixels)
        except Exception as error:  # noqa: BLE001
            return (*empty[:4], None, _problem(error), [], [])
        return (*empty[:4], picture(image, None), "image ready: ask a question", [], [])

    def compare(image_path, question, method, budget):
        """API: one turn on both sides; errors reach the client as one line."""
        try:
            image = open_image(image_path, engine.max_image_pixels)
            full = engine.answer(image, [], question, engine.setting(None, None), max_new_tokens=max_new_tokens)
            comp = engine.answer(image, [], question, engine.setting(method, budget), max_new_tokens=max_new_tokens)
        except Exception as error:  # noqa: BLE001
            raise gr.Error(_problem(error).removeprefix("⚠️ ")) from None
        return full.text, comp.text, {"full": full.metrics.as_dict(), "compressed": comp.metrics.as_dict()}

    with gr.Blocks(title="LLaVA + ADSC: full vs compressed") as demo:
        gr.Markdown("## LLaVA + ADSC: the full model and the compressed one, side by side\n"
                    "Upload an image, ask a question; the compressed pane prunes vision tokens with the chosen "
                    "method at the chosen budget (mean vision tokens per decoder layer).")
        full_history, comp_history = gr.State([]), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image", file_count="single", type="filepath", elem_id="image-upload")
                method_box = gr.Dropdown(list(PRUNE_METHODS), value=method, label="method (compressed pane)",
                                         elem_id="method")
                budget_box = gr.Slider(1, num_patches, value=budget, step=1, label="vision-token budget",
                                       elem_id="budget")
                status = gr.Markdown("upload an image", elem_id="status")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label="playground images")
            with gr.Column(scale=3):
                with gr.Row():
                    with gr.Column():
                        full_chat = gr.Chatbot(label="full model", elem_id="full-chat", height=300)
                        full_metrics = gr.Markdown(elem_id="full-metrics")
                    with gr.Column():
                        comp_chat = gr.Chatbot(label="compressed", elem_id="compressed-chat", height=300)
                        comp_metrics = gr.Markdown(elem_id="compressed-metrics")
                kept = gr.Image(label="what the compressed model kept", type="pil", interactive=False,
                                elem_id="kept", height=320)
        with gr.Row():
            question = gr.Textbox(label="question", placeholder="Ask about the image", elem_id="question", scale=4)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        outputs = [full_chat, comp_chat, full_metrics, comp_metrics, kept, status, full_history, comp_history]
        inputs = [upload, question, method_box, budget_box, full_history, comp_history, full_chat, comp_chat]
        send.click(stream_both, inputs, outputs, api_name="chat", concurrency_limit=1)
        question.submit(stream_both, inputs, outputs, api_name=False, concurrency_limit=1)
        upload.change(new_image, [upload], [full_chat, comp_chat, full_metrics, comp_metrics, kept, status,
                                            full_history, comp_history], api_name=False)
        for box in (method_box, budget_box):
            box.change(redraw, [upload, question, method_box, budget_box, comp_history], [kept, status],
                       api_name=False, concurrency_limit=1)

        # The scripting endpoint: hidden components, one call per request.
        api_image = gr.File(visible=False, type="filepath")
        api_question, api_method = gr.Textbox(visible=False), gr.Textbox(visible=False)
        api_budget = gr.Number(visible=False)
        api_full, api_comp, api_metrics = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.JSON(visible=False)
        api_button = gr.Button(visible=False)
        api_button.click(compare, [api_image, api_question, api_method, api_budget], [api_full, api_comp, api_metrics],
                         api_name="compare", concurrency_limit=2)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.serve.gradio_demo", description=__doc__.split("\n\n")[0])
    add_model_args(parser, model_path_help="checkpoint folder or hub id (default: the playground's fine-tuned "
                                           "ADSC checkpoint, playground/runs/default/checkpoints/adsc-1of3)")
    parser.add_argument("--prune-method", choices=PRUNE_METHODS, default="adsc", help="the compressed pane's first method")
    parser.add_argument("--vision-token-budget", type=float, default=None,
                        help="the compressed pane's first budget (default: a third of the vision tokens)")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    add_debug_arg(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MissingDependencyError("the demo needs gradio: pip install -e '.[demo]'") from None
    check_port_free(args.host, args.port)  # before the model loads
    args.model_path = args.model_path or default_model_path()
    tokenizer, model, image_processor, _ = load_model_from_args(args)
    engine = ChatEngine(tokenizer, model, image_processor, args.conv_mode, args.max_image_pixels)
    try:
        engine.setting(args.prune_method, args.vision_token_budget or max(1, round(engine.num_patches / 3)))
    except ScheduleError as error:
        fail(error)
    demo = build_demo(engine, args.prune_method, args.vision_token_budget, playground_examples(), args.max_new_tokens)
    logger.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=False, max_file_size="50mb")
    except OSError as error:  # taken between the check and the launch
        raise InputError(f"cannot serve on {args.host}:{args.port} ({error}): choose another with --port") from None
    return demo


def check_port_free(host: str, port: int) -> None:
    """``InputError`` naming ``--port`` when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"cannot serve on {host}:{port} ({error.strerror or error}): "
                             "choose another with --port") from None


if __name__ == "__main__":
    run_command(main)
