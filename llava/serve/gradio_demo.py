"""Side-by-side web demo: the same image and question to the full and the compressed model.

``python -m llava.serve.gradio_demo [--model-path P] [--model-base B] [--load-4bit]
[--prune-method M] [--vision-token-budget B] [--prune-layers L] [--host 127.0.0.1] [--port 7860]``

One model in memory serves both panes; each call carries its own pruning setting
(``ChatEngine.setting`` -> ``model.pruned_as``), so concurrent requests never share a
schedule. The compressed pane starts at the checkpoint's recorded schedule (method, budget,
layers); another method takes the checkpoint's layers where they fit it, the layers box
changes them, and the budget slider spans what the method at those layers can reach (the
solver's range). A warm-up call per pane runs before serving.

Under each reply two lines: the prefill of its prompt (vision tokens per layer, KV-cache MB
read off the call's cache without the answer's positions, FLOPs of the tower, projector,
ranking and prefill from the profiler, time to first token), then the answer (tokens,
tokens/s, decode FLOPs, the cache after it). The picture shows the patches that survived
each stage (or the merge groups of a pre-LLM method) of the compressed pane's last reply,
captioned with its setting: always the setting its metrics describe. Bad input (no image, a
non-image, a huge image or upload, an empty question, a prompt over the context length, an
unreachable budget, bad layers) and model errors give one line in the status box and a log
line with the cause; the demo keeps serving.

Scripts call ``api_name="compare"``: (image file, question, method, budget) -> (full answer,
compressed answer, metrics JSON ``{"full": {...}, "compressed": {...}}`` with
``mean_vision_tokens``, ``prefill_kv_mb``, ``prefill_gflops``, ``kv_mb``, ``ttft_ms``, ...), e.g.
with ``gradio_client``::

    Client("http://127.0.0.1:7860").predict(handle_file("img.png"), "What is shown?", "adsc", 192,
                                            api_name="/compare")
"""

from __future__ import annotations

import argparse
import socket
import glob
import logging
import os

from adsc_patch import ScheduleError
from adsc_patch.methods import is_pre_llm
from adsc_patch.spec import PruningSpec, add_spec_flags, spec_from_flags

from ..cli import InputError, MissingDependencyError, add_debug_arg, fail, run_command
from ..eval.inference import add_model_args, load_model_from_args, load_vlm_from_args
from ..model.vlm import is_transformers_vlm
from ..eval.pruning_args import parse_layer_list
from .chat import MAX_IMAGE_PIXELS, ChatEngine, open_image
from .vlm_chat import VlmChatEngine

logger = logging.getLogger("llava.serve.gradio_demo")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYGROUND_RUN = os.path.join(ROOT, "playground", "runs", "default")
PLAYGROUND_CHECKPOINT = os.path.join(PLAYGROUND_RUN, "checkpoints", "adsc-1of3")
MAX_UPLOAD_BYTES = 50_000_000
GRADIO_UPLOAD_GUARD_BYTES = 1_000_000_000


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


def parse_layers(text: str | None) -> list[int] | None:
    """The layers box: comma-separated decoder layers; empty: ``None`` (the method's own)."""
    if not (text or "").strip():
        return None
    try:
        return parse_layer_list(text)
    except argparse.ArgumentTypeError:
        raise InputError(f"prune layers {text.strip()!r}: give comma-separated decoder layers, e.g. 1, 4") from None


def _metrics_md(metrics) -> str:
    return f"{metrics.prefill_line()}  \n{metrics.answer_line()}"


def layers_text(layers) -> str:
    return ", ".join(map(str, layers))


def playground_question_hint(model_path: str | None) -> str | None:
    """A question of the playground's kind when ``model_path`` is a checkpoint of a playground
    run (its run folder, two levels up, holds ``study_config.json``)."""
    if not model_path or not os.path.isdir(model_path):
        return None
    run = os.path.dirname(os.path.dirname(os.path.abspath(model_path)))
    if not os.path.isfile(os.path.join(run, "study_config.json")):
        return None
    # the playground's main task (playground/digitgrid.py's TRANSCRIBE_PROMPT); its other questions are barely trained
    return "e.g. Describe the grid. (the model transcribes the 16 cells row by row)"


def check_upload_size(path: str, max_bytes: int) -> None:
    """``InputError`` naming the file when it is over ``max_bytes``."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise InputError(f"{os.path.basename(path)}: {size / 1e6:.1f} MB is over the upload limit of "
                         f"{max_bytes / 1e6:g} MB")


def build_demo(engine: ChatEngine, method: str | None = None, budget: float | None = None,
               examples: list[str] | None = None, max_new_tokens: int = 64, prune_layers=None,
               question_hint: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES, warm_up: bool = True):
    """The gradio ``Blocks`` app over ``engine`` (``launch`` it, or test it in-process).

    The compressed pane starts at ``method`` / ``budget`` / ``prune_layers``, each defaulting
    to the checkpoint's recorded schedule (``ChatEngine.default_setting``); ``warm_up`` runs
    both first settings once before serving."""
    import gradio as gr

    default_method, default_budget = engine.default_choice()
    method = method or default_method
    if budget is None:
        budget = default_budget if method == default_method and default_budget else engine.default_budget()
    if prune_layers is None:
        prune_layers = engine.prune_layers_for(method)
    first = engine.setting(method, budget, prune_layers)  # refuses an unreachable start before serving
    low, high = engine.reachable_budgets(method, None if is_pre_llm(method) else prune_layers)
    if warm_up:
        engine.warm_up([engine.setting(None, None), first])
    picture = engine.picture

    def describe(method, budget, layers_box):
        """The setting the controls ask for, or the line refusing it."""
        return engine.setting(method, budget, parse_layers(layers_box))

    def stream_both(image_path, question, method, budget, layers_box, full_history, comp_history, full_msgs,
                    comp_msgs):
        """Generator of (full chat, compressed chat, full metrics, compressed metrics, picture,
        caption, status, full history, compressed history) updates."""
        full_msgs, comp_msgs = list(full_msgs or []), list(comp_msgs or [])
        keep = (gr.update(),) * 6
        try:
            image = open_image(image_path, engine.max_image_pixels)
            full_setting, comp_setting = engine.setting(None, None), describe(method, budget, layers_box)
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
                           _metrics_md(replies["full"].metrics) if "full" in replies else gr.update(),
                           _metrics_md(replies["compressed"].metrics) if "compressed" in replies else gr.update(),
                           gr.update(), gr.update(), f"answering ({pane})…", full_history, comp_history)
        except Exception as error:  # noqa: BLE001
            yield (*keep, _problem(error), full_history, comp_history)
            return
        caption = f"kept by the compressed pane's last reply: {engine.label(comp_setting)}"
        yield (full_msgs, comp_msgs, _metrics_md(replies["full"].metrics), _metrics_md(replies["compressed"].metrics),
               picture(image, replies["compressed"].trace), caption, "done", replies["full"].history,
               replies["compressed"].history)

    def new_method(method, layers_box):
        """A new method: its layers on this checkpoint, the budgets they reach."""
        own = () if is_pre_llm(method) else engine.prune_layers_for(method)
        box = gr.update(value=layers_text(own), interactive=not is_pre_llm(method))
        return (box, *new_layers(method, layers_text(own), None)[1:])

    def new_layers(method, layers_box, budget):
        """New layers: the budget slider's range becomes what they reach (the value kept inside it)."""
        try:
            chosen = None if is_pre_llm(method) else (parse_layers(layers_box) or engine.prune_layers_for(method))
            low, high = engine.reachable_budgets(method, chosen)
        except Exception as error:  # noqa: BLE001
            return gr.update(), gr.update(), _problem(error)
        value = min(max(budget if budget is not None else low, low), high)
        where = "" if chosen is None else f" at layer{'s' if len(chosen) > 1 else ''} {layers_text(chosen)}"
        return (gr.update(), gr.update(minimum=low, maximum=high, value=value),
                f"{method}{where} reaches budgets {low}–{high}: send to compare")

    def check_setting(method, budget, layers_box):
        try:
            return f"{engine.label(describe(method, budget, layers_box))}: send to compare"
        except Exception as error:  # noqa: BLE001
            return _problem(error)

    def new_image(image_path):
        """A new upload starts a new chat; a bad one says why and empties the box (the status
        stays when the box is emptied so)."""
        cleared = ([], [], "", "", None, "", [], [])
        if not image_path:
            return (gr.update(), None, *cleared[:4], None, "", gr.update(), [], [])
        try:
            check_upload_size(image_path, max_upload_bytes)
            image = open_image(image_path, engine.max_image_pixels)
        except Exception as error:  # noqa: BLE001
            return (None, None, *cleared[:4], None, "", _problem(error), [], [])
        return (gr.update(), image, *cleared[:4], picture(image, None),
                "the whole image (nothing asked yet)", "image ready: ask a question", [], [])

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
                    "method at the chosen budget (mean vision tokens per decoder layer). Each pane's first metrics "
                    "line is its prompt's prefill, the second its answer.")
        full_history, comp_history = gr.State([]), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image", file_count="single", type="filepath", elem_id="image-upload")
                preview = gr.Image(label="your image", type="pil", interactive=False, elem_id="preview", height=200)
                method_box = gr.Dropdown(list(engine.methods), value=method, label="method (compressed pane)",
                                         elem_id="method")
                layers_box = gr.Textbox(value=layers_text(prune_layers), label="prune layers (decoder layers)",
                                        interactive=not is_pre_llm(method), elem_id="layers")
                budget_box = gr.Slider(low, high, value=min(max(budget, low), high), step=engine.budget_step,
                                       label=engine.budget_label, elem_id="budget")
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
                kept_caption = gr.Markdown(elem_id="kept-caption")
        with gr.Row():
            question = gr.Textbox(label="question", placeholder=question_hint or "Ask about the image",
                                  elem_id="question", scale=4)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        outputs = [full_chat, comp_chat, full_metrics, comp_metrics, kept, kept_caption, status, full_history,
                   comp_history]
        inputs = [upload, question, method_box, budget_box, layers_box, full_history, comp_history, full_chat,
                  comp_chat]
        send.click(stream_both, inputs, outputs, api_name="chat", concurrency_limit=1)
        question.submit(stream_both, inputs, outputs, api_name=False, concurrency_limit=1)
        upload.change(new_image, [upload], [upload, preview, full_chat, comp_chat, full_metrics, comp_metrics, kept,
                                            kept_caption, status, full_history, comp_history], api_name=False)
        upload.clear(lambda: "upload an image", None, status, api_name=False)
        method_box.change(new_method, [method_box, layers_box], [layers_box, budget_box, status], api_name=False)
        layers_box.submit(new_layers, [method_box, layers_box, budget_box], [layers_box, budget_box, status],
                          api_name=False)
        layers_box.blur(new_layers, [method_box, layers_box, budget_box], [layers_box, budget_box, status],
                        api_name=False)
        budget_box.input(check_setting, [method_box, budget_box, layers_box], [status], api_name=False,
                         trigger_mode="always_last")

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
    add_spec_flags(parser, title="the compressed pane's first setting (default: the checkpoint's recorded one, "
                                 "else adsc at a third of the vision tokens, at the checkpoint's layers where "
                                 "they fit the method, else the method's own)")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS)
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 1e6,
                        help="larger uploads are refused in the status line")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    add_debug_arg(parser)
    return parser


def first_setting_from_flags(args, model) -> tuple[str | None, float | None, list[int] | None]:
    """``(method, budget, prune layers)`` of the compressed pane's first setting from the pruning
    flags (``adsc_patch.spec.spec_from_flags`` on top of the checkpoint's own spec); ``None``s
    leave each to ``build_demo``'s defaults. A ratio is shown as the budget it means. ``model``:
    ours, or a chat engine; for a ``VlmChatEngine`` the budget is the fraction of each image's
    tokens (``--budget-fraction``)."""
    if args.no_pruning:
        raise InputError("--no-pruning: the demo's compressed pane always prunes (the other pane is the full model)")
    if isinstance(model, VlmChatEngine):
        return _first_vlm_setting(args, model)
    if isinstance(model, ChatEngine):
        model = model.model
    spec = spec_from_flags(args, PruningSpec.from_config(model.config))
    if spec is None:
        return None, None, None
    if args.prune_selection is not None:
        model.configure_pruning(selection=args.prune_selection)
    given_unit = any(getattr(args, name) is not None for name in ("vision_token_budget", "budget_fraction", "drop_ratio"))
    budget = None
    if given_unit:
        _, schedule = model.resolve_spec(spec)
        budget = spec.budget_for(model.get_vision_tower().num_patches) if spec.drop_ratio is None \
            else schedule.average_tokens
    return (args.prune_method, budget, None if args.prune_layers is None else list(args.prune_layers))


def _first_vlm_setting(args, engine: VlmChatEngine) -> tuple[str | None, float | None, list[int] | None]:
    for flag, value in (("--vision-token-budget", args.vision_token_budget), ("--drop-ratio", args.drop_ratio)):
        if value is not None:
            raise InputError(f"{flag}: this model's images differ in size; the demo's budget is --budget-fraction")
    if args.prune_selection not in (None, "uniform_2d"):
        raise InputError("--prune-selection: the demo runs the default selection on this model")
    return (args.prune_method, args.budget_fraction, None if args.prune_layers is None else list(args.prune_layers))


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MissingDependencyError("the demo needs gradio: pip install -e '.[demo]'") from None
    check_port_free(args.host, args.port)  # before the model loads
    args.model_path = args.model_path or default_model_path()
    if is_transformers_vlm(args.model_path, args.model_base):
        engine = VlmChatEngine(load_vlm_from_args(args), args.max_image_pixels)
    else:
        tokenizer, model, image_processor, _ = load_model_from_args(args)
        engine = ChatEngine(tokenizer, model, image_processor, args.conv_mode, args.max_image_pixels)
    try:
        method, budget, prune_layers = first_setting_from_flags(args, engine)
        demo = build_demo(engine, method, budget, playground_examples(),
                          args.max_new_tokens, prune_layers=prune_layers,
                          question_hint=playground_question_hint(args.model_path),
                          max_upload_bytes=int(args.max_upload_mb * 1e6))
    except ScheduleError as error:
        fail(error)
    logger.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    try:
        # gradio's own limit is only the last guard: uploads over --max-upload-mb are refused in the status line
        demo.launch(server_name=args.host, server_port=args.port, show_error=False,
                    max_file_size=max(GRADIO_UPLOAD_GUARD_BYTES, int(args.max_upload_mb * 1e6)))
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
