"""Our model in lmms-eval's own evaluator (``llava.eval.lmms_adsc``, found through its entry
point), offline, on local tasks written here over the tiny POPE and MME files.

The tasks use lmms-eval's own POPE and MME prompt, result and aggregation functions; only the
images come from disk. The tiny checkpoints are steered to answer "Yes" or "No" (their
``lm_head`` holds one row for each, of opposite sign, and nothing else, so the first token is
one of the two): on such answers lmms-eval's scoring and LLaVA's official scoring (ours) must
agree, and they are compared on the very answers lmms-eval's run produced. The answers
themselves must be ``model_vqa_loader``'s for the same prompts and setting."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is installed by scripts/test.sh (setup.py's lmms extra)")

from llava.cli import UsageExit  # noqa: E402
from llava.eval import model_vqa_loader  # noqa: E402
from llava.eval.eval_mme import score_mme  # noqa: E402
from llava.eval.eval_pope import SPLITS, score_pope  # noqa: E402
from llava.tools.make_tiny_benchmarks import make_tiny_benchmarks  # noqa: E402
from tests.helpers import read_lines  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "lmms_eval_imported")


@pytest.fixture(scope="module")
def lmms_eval_imported():
    """lmms-eval's evaluator, imported here and not at collection: importing its task module sets
    PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES``, which would let truncated images pass
    every other module's image checks; the flag is put back when this module is done."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    importlib.import_module("lmms_eval.evaluator")
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


def simple_evaluate(*args, **kwargs):
    from lmms_eval.evaluator import simple_evaluate as evaluate

    return evaluate(*args, **kwargs)


def TaskManager(*args, **kwargs):  # noqa: N802 - lmms-eval's class, imported late
    from lmms_eval.tasks import TaskManager as manager

    return manager(*args, **kwargs)

YES_NO_TEXT = ["Yes No yes no Yes. No."] * 5
SHORT = "\nAnswer the question using a single word or phrase."

UTILS = '''"""lmms-eval's own POPE and MME functions; only the images are read from disk."""
from PIL import Image
from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_doc_to_text, mme_process_results
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score, pope_doc_to_text,
                                        pope_process_results)


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]
'''


def _yaml(task, data, doc_to_text, process, metrics):
    lines = [f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
             "test_split: test", "output_type: generate_until", "doc_to_visual: !function utils.doc_to_visual",
             f"doc_to_text: !function utils.{doc_to_text}", 'doc_to_target: "answer"', "generation_kwargs:",
             "  max_new_tokens: 1", "  temperature: 0", "  do_sample: false", '  until: ["<|never|>"]',
             f"process_results: !function utils.{process}", "metric_list:"]
    for metric, aggregation in metrics:
        lines += [f"  - metric: {metric}", f"    aggregation: !function utils.{aggregation}",
                  "    higher_is_better: true"]
    lines += ["lmms_eval_specific_kwargs:", "  default:", '    pre_prompt: ""',
              '    post_prompt: "\\nAnswer the question using a single word or phrase."', "metadata:", "  version: 0.0"]
    return "\n".join(lines) + "\n"


def _jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The tiny benchmarks and lmms-eval tasks over them: POPE per split, MME."""
    root = make_tiny_benchmarks(str(tmp_path_factory.mktemp("bench")), per_benchmark=4)
    tasks = tmp_path_factory.mktemp("lmms_tasks")
    (tasks / "utils.py").write_text(UTILS)
    questions = [json.loads(line) for line in read_lines(f"{root}/pope/llava_pope_test.jsonl")]
    for split in SPLITS:
        labels = {(a["image"], a["text"]): a["label"]
                  for a in map(json.loads, read_lines(f"{root}/pope/coco/coco_pope_{split}.json"))}
        docs = [{"question_id": q["question_id"], "question": q["text"].split("\n")[0],
                 "answer": labels[(q["image"], q["text"].split("\n")[0])],
                 "image_path": f"{root}/pope/val2014/{q['image']}"} for q in questions if q["category"] == split]
        data = _jsonl(tasks / f"pope_{split}.jsonl", docs)
        (tasks / f"pope_{split}.yaml").write_text(_yaml(
            f"adsc_test_pope_{split}", data, "pope_doc_to_text", "pope_process_results",
            [("pope_accuracy", "pope_aggregate_accuracy"), ("pope_f1_score", "pope_aggregate_f1_score")]))
    base = f"{root}/MME/MME_Benchmark_release_version"
    docs = []
    for q in map(json.loads, read_lines(f"{root}/MME/llava_mme.jsonl")):
        category, name = q["image"].split("/")
        truth = dict(line.rstrip("\n").split("\t") for line in open(f"{base}/{category}/{name[:-4]}.txt"))
        question = q["text"].removesuffix(SHORT) + " Please answer yes or no."
        docs.append({"question_id": q["question_id"], "question": question, "answer": truth[question],
                     "category": category, "image_path": f"{base}/{q['image']}"})
    data = _jsonl(tasks / "mme.jsonl", docs)
    (tasks / "mme.yaml").write_text(_yaml("adsc_test_mme", data, "mme_doc_to_text", "mme_process_results",
                                          [("mme_perception_score", "mme_aggregate_results"),
                                           ("mme_cognition_score", "mme_aggregate_results")]))
    return root, str(tasks)


def _steer_to_yes_no(folder, tokenizer, common=None):
    """Keep only the "Yes" and "No" rows of the checkpoint's ``lm_head`` (one the other's negative);
    ``common``: a direction every prompt's last hidden state shares, taken out of the row so
    that the answer follows what differs between prompts."""
    yes, no = (tokenizer.encode(word, add_special_tokens=False) for word in ("Yes", "No"))
    assert len(yes) == len(no) == 1, (yes, no)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    head = state["lm_head.weight"]
    row = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(7))
    if common is not None:
        row -= (row @ common) / (common @ common) * common
    state["lm_head.weight"] = torch.zeros_like(head)
    state["lm_head.weight"][yes[0]], state["lm_head.weight"][no[0]] = row, -row
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def yes_no_llava(tmp_path_factory):
    from llava.model.builder import load_tokenizer
    from llava.tools.make_tiny_checkpoint import make_tiny_checkpoint, train_tiny_tokenizer

    folder = make_tiny_checkpoint(str(tmp_path_factory.mktemp("yes_no_llava")), seed=3)
    train_tiny_tokenizer(folder, extra_text=YES_NO_TEXT)
    return _steer_to_yes_no(folder, load_tokenizer(folder))


@pytest.fixture(scope="module")
def yes_no_qwen(tmp_path_factory, bench):
    from transformers import AutoTokenizer

    from PIL import Image

    from llava.model.vlm import chat_messages, encode_prompts, load_transformers_vlm
    from llava.tools.make_tiny_vlm import make_tiny_vlm

    folder = make_tiny_vlm(str(tmp_path_factory.mktemp("yes_no_qwen")), seed=3, extra_text=YES_NO_TEXT)
    loaded = load_transformers_vlm(folder, device="cpu")
    root = bench[0]
    questions = [json.loads(line) for line in read_lines(f"{root}/pope/llava_pope_test.jsonl")]
    inputs = encode_prompts(loaded, [chat_messages([(q["text"], None)]) for q in questions],
                            [[Image.open(f"{root}/pope/val2014/{q['image']}").convert("RGB")] for q in questions])
    with torch.no_grad():
        last = loaded.model.model(**inputs).last_hidden_state[:, -1]
    return _steer_to_yes_no(folder, AutoTokenizer.from_pretrained(folder), common=last.mean(0))


def _evaluate(tasks_dir, model_args, batch_size=2, model="adsc"):
    """lmms-eval's evaluator on the four tasks; ``model``: the registered name (with
    ``model_args``), or an instance."""
    tasks = [f"adsc_test_pope_{split}" for split in SPLITS] + ["adsc_test_mme"]
    return simple_evaluate(model=model, model_args=model_args if isinstance(model, str) else None, tasks=tasks,
                           batch_size=batch_size, log_samples=True,
                           task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))


def _answers(results, task) -> dict:
    """question_id -> the answer lmms-eval recorded for it."""
    return {sample["doc"]["question_id"]: sample["filtered_resps"][0] for sample in results["samples"][task]}


def _ours(answers: dict, question_file, path) -> str:
    """An answers file in our format (the question file's prompts) holding ``answers``."""
    records = []
    for q in map(json.loads, read_lines(question_file)):
        records.append({"question_id": q["question_id"], "prompt": q["text"], "text": answers[q["question_id"]],
                        "answer_id": "", "model_id": "tiny", "metadata": {}})
    return _jsonl(path, records)


def _loader_answers(checkpoint, question_file, image_folder, out, flags) -> dict:
    model_vqa_loader.main(["--model-path", checkpoint, "--question-file", question_file, "--image-folder", image_folder,
                           "--answers-file", str(out), "--temperature", "0", "--max_new_tokens", "1",
                           "--batch-size", "2", "--num-workers", "0", "--device", "cpu", *flags])
    return {(r["question_id"], r["prompt"]): r["text"] for r in map(json.loads, read_lines(out))}


def _check_against_ours(results, root, checkpoint, flags, tmp_path):
    pope = {}
    for split in SPLITS:
        pope.update(_answers(results, f"adsc_test_pope_{split}"))
    assert set(pope.values()) <= {"Yes", "No"} and len(set(pope.values())) == 2  # well-formed, both answers given
    scored = score_pope(f"{root}/pope/coco", f"{root}/pope/llava_pope_test.jsonl",
                        _ours(pope, f"{root}/pope/llava_pope_test.jsonl", tmp_path / "pope.jsonl"))
    for split in SPLITS:
        theirs = results["results"][f"adsc_test_pope_{split}"]
        assert theirs["pope_accuracy,none"] == pytest.approx(scored[split]["accuracy"])
        assert theirs["pope_f1_score,none"] == pytest.approx(scored[split]["f1"])
    mme_questions = f"{root}/MME/llava_mme.jsonl"
    by_prompt = {}
    for q in map(json.loads, read_lines(mme_questions)):  # MME repeats ids: two questions per image
        by_prompt[(q["question_id"], q["text"])] = None
    samples = results["samples"]["adsc_test_mme"]
    answers = {(s["doc"]["question_id"], s["doc"]["question"].removesuffix(" Please answer yes or no.") + SHORT):
               s["filtered_resps"][0] for s in samples}
    assert set(answers) == set(by_prompt)
    records = [{"question_id": qid, "prompt": prompt, "text": text, "answer_id": "", "model_id": "tiny",
                "metadata": {}} for (qid, prompt), text in answers.items()]
    scored = score_mme(f"{root}/MME/MME_Benchmark_release_version", _jsonl(tmp_path / "mme.jsonl", records))
    theirs = results["results"]["adsc_test_mme"]
    assert theirs["mme_perception_score,none"] == pytest.approx(scored["perception"])
    assert theirs["mme_cognition_score,none"] == pytest.approx(scored["cognition"])
    # the same answers as our loader gives for the same prompts and setting
    loader_pope = _loader_answers(checkpoint, f"{root}/pope/llava_pope_test.jsonl", f"{root}/pope/val2014",
                                  tmp_path / "loader_pope.jsonl", flags)
    assert {qid: text for (qid, _), text in loader_pope.items()} == pope
    loader_mme = _loader_answers(checkpoint, mme_questions, f"{root}/MME/MME_Benchmark_release_version",
                                 tmp_path / "loader_mme.jsonl", flags)
    assert loader_mme == answers
    return pope, answers


@pytest.mark.parametrize("pruning, flags, schedule", [
    ("", [], None),
    ("method=adsc,vision_token_budget=12,prune_layers=1;2", ["--prune-method", "adsc", "--vision-token-budget", "12",
                                                             "--prune-layers", "1,2"], ("adsc", 12, (1, 2))),
    ("method=fastv,vision_token_budget=20,prune_layers=2", ["--prune-method", "fastv", "--vision-token-budget", "20",
                                                            "--prune-layers", "2"], ("fastv", 20, (2,))),
])
def test_llava_through_lmms_eval_scores_as_our_scorers_and_answers_as_our_loader(bench, yes_no_llava, tmp_path,
                                                                                  pruning, flags, schedule):
    from adsc_patch.solve import solve_method
    from llava.eval.lmms_adsc import AdscLmms

    root, tasks = bench
    stats_file = tmp_path / "stats.jsonl"
    model = AdscLmms.create_from_arg_string(
        ",".join(filter(None, [f"pretrained={yes_no_llava}", "device=cpu", pruning, f"stats_file={stats_file}"])),
        {"batch_size": 2})
    results = _evaluate(tasks, None, model=model)
    _check_against_ours(results, root, yes_no_llava, flags, tmp_path)
    # every request ran the schedule asked for (36 tokens of a 6 x 6 grid, 4 layers; CLIP runs 1 of 2 layers)
    expected = 36.0 if schedule is None else solve_method(schedule[0], schedule[1], 4, (6, 6), 1,
                                                          schedule[2]).schedule.average_tokens
    assert len(model.request_stats) == 40
    assert all(stats.mean_vision_tokens == pytest.approx(expected) for stats in model.request_stats)
    written = [json.loads(line) for line in read_lines(stats_file)]
    assert {(r["task"], r["doc_id"]) for r in written} == {(task, sample["doc_id"]) for task in results["samples"]
                                                           for sample in results["samples"][task]}
    assert all(r["mean_vision_tokens"] == pytest.approx(expected) and r["kv_bytes"] > 0 for r in written)


def test_qwen2_5_vl_through_lmms_eval_scores_as_our_scorers_and_answers_as_our_loader(bench, yes_no_qwen, tmp_path):
    root, tasks = bench
    results = _evaluate(tasks, f"pretrained={yes_no_qwen},device=cpu,method=fastv,budget_fraction=0.5,prune_layers=2")
    _check_against_ours(results, root, yes_no_qwen,
                        ["--prune-method", "fastv", "--budget-fraction", "0.5", "--prune-layers", "2"], tmp_path)


@pytest.mark.parametrize("model_args, message", [
    ("bogus=1", "bogus"),
    ("method=nope", "nope"),
    ("vision_token_budget=0.5,prune_layers=1;2", "budget"),
    ("prune_layers=a;b,drop_ratio=0.5", "prune_layers"),
])
def test_a_bad_model_argument_ends_in_one_line_naming_it(bench, yes_no_llava, capsys, model_args, message):
    with pytest.raises(UsageExit) as caught:
        _evaluate(bench[1], f"pretrained={yes_no_llava},device=cpu,{model_args}")
    line = str(caught.value)
    assert line.startswith("error: ") and message in line and "\n" not in line


def test_two_processes_under_accelerate_launch_give_the_single_process_results(bench, yes_no_llava, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo) with lmms-eval's own
    command line: the requests are shared between the two ranks (both write to the stats file)
    and the metrics equal the single-process run's."""
    root, tasks = bench
    stats = tmp_path / "stats.jsonl"
    model_args = f"pretrained={yes_no_llava},device=cpu,method=adsc,vision_token_budget=12,prune_layers=1;2"
    names = ["adsc_test_pope_adversarial", "adsc_test_mme"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval",
         "--model", "adsc", "--model_args", f"{model_args},stats_file={stats}", "--tasks", ",".join(names),
         "--include_path", tasks, "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    results_files = list((tmp_path / "out").rglob("*_results.json"))
    assert done.returncode == 0 and len(results_files) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    two = json.loads(results_files[0].read_text())["results"]
    assert {json.loads(line)["rank"] for line in read_lines(stats)} == {0, 1}
    one = simple_evaluate(model="adsc", model_args=model_args, tasks=names, batch_size=2,
                          task_manager=TaskManager(include_path=tasks, include_defaults=False))["results"]
    for task in names:
        metrics = [m for m, v in one[task].items() if isinstance(v, float) and "stderr" not in m]
        assert metrics
        for metric in metrics:
            assert two[task][metric] == pytest.approx(one[task][metric]), (task, metric)


def test_the_batch_size_does_not_change_the_answers(bench, yes_no_llava):
    """lmms-eval warns that LLaVA's scores move with the batch size; ours are left-padded batches
    whose rows equal each prompt alone (tests/llava/test_generation.py), so batch 1 and 4 give
    the same answers here (fp32; docs/evaluation.md says what half precision on a GPU may do)."""
    model_args = f"pretrained={yes_no_llava},device=cpu,method=adsc,vision_token_budget=12,prune_layers=1;2"
    one, four = (_evaluate(bench[1], model_args, batch_size=size) for size in (1, 4))
    for task in one["samples"]:
        assert _answers(one, task) == _answers(four, task) or task == "adsc_test_mme"
    assert [(s["doc_id"], s["filtered_resps"]) for s in one["samples"]["adsc_test_mme"]] == \
        [(s["doc_id"], s["filtered_resps"]) for s in four["samples"]["adsc_test_mme"]]


def _instance(request_type, arguments, doc_id, task="t"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module")
def lmms_model(yes_no_llava):
    from llava.eval.lmms_adsc import AdscLmms

    model = AdscLmms.create_from_arg_string(
        f"pretrained={yes_no_llava},device=cpu,method=adsc,vision_token_budget=12,prune_layers=1;2", {"batch_size": 2})
    return model


def test_loglikelihood_is_the_first_generated_steps_log_probability(bench, lmms_model):
    """For a one-token continuation: its log-probability (a full forward over prompt + answer)
    equals ``log_softmax`` of ``generate``'s first-step logits at that token (a cached prefill),
    both pruned; ``is_greedy`` says whether it is the generated answer."""
    from llava.eval.inference import encode_question

    root = bench[0]
    questions = [json.loads(line) for line in read_lines(f"{root}/pope/llava_pope_test.jsonl")][:3]
    docs = {i: {"image_path": f"{root}/pope/val2014/{q['image']}"} for i, q in enumerate(questions)}
    lmms_model.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [Image.open(doc["image_path"])]

    requests = [_instance("loglikelihood", (q["text"], word, visual, i, "t", "test"), i)
                for i, q in enumerate(questions) for word in ("Yes", "No")]
    results = lmms_model.loglikelihood(requests)
    model, tokenizer = lmms_model.model, lmms_model.tokenizer
    for i, q in enumerate(questions):
        ids, pixels = encode_question(q["text"], visual(docs[i])[0].convert("RGB"), tokenizer,
                                      lmms_model.image_processor, model.config, lmms_model.conv_mode)
        with torch.no_grad():
            out = model.generate(ids[None], images=pixels[None], max_new_tokens=1, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        first = out.logits[0][0].float().log_softmax(-1)
        for k, word in enumerate(("Yes", "No")):
            token = tokenizer.encode(word, add_special_tokens=False)[0]
            logprob, greedy = results[2 * i + k]
            assert logprob == pytest.approx(float(first[token]), abs=1e-4)
            assert greedy == (int(out.sequences[0, -1]) == token)


def test_multi_round_answers_each_round_as_generate_until_answers_its_text(bench, lmms_model):
    """Two rounds by lmms-eval's protocol: round 0 the request's context, round 1 what the task's
    ``doc_to_text`` makes of the first answer; each answer is ``generate_until``'s for that text."""
    root = bench[0]
    q = json.loads(read_lines(f"{root}/pope/llava_pope_test.jsonl")[0])
    doc = {"image_path": f"{root}/pope/val2014/{q['image']}"}
    lmms_model.task_dict = {"t": {"test": {0: doc}}}

    def visual(d):
        return [Image.open(d["image_path"])]

    def doc_to_text(d, previous_output, round_idx, previous_round_info):
        last = round_idx >= 2
        return visual(d), f"You said {previous_output[-1]}. Are you sure?", last, previous_output, None

    gen = {"max_new_tokens": 1, "temperature": 0, "until": ["<|never|>"]}
    (rounds,) = lmms_model.generate_until_multi_round(
        [_instance("generate_until_multi_round", (q["text"], gen, visual, doc_to_text, 0, "t", "test"), 0)])
    assert len(rounds) == 2
    single = lmms_model.generate_until([
        _instance("generate_until", (text, gen, visual, 0, "t", "test"), 0)
        for text in (q["text"], f"You said {rounds[0]}. Are you sure?")])
    assert list(rounds) == single


@pytest.mark.parametrize("bits", [4, 8])
def test_load_4bit_and_8bit_quantise_the_language_model_and_answer_as_our_loader(bench, yes_no_llava, tmp_path, bits):
    """``load_4bit`` / ``load_8bit``: the language model's linears are bitsandbytes layers, the
    vision tower is not, and the answers are the loader's with the same flag."""
    bnb = pytest.importorskip("bitsandbytes")
    from llava.eval.lmms_adsc import AdscLmms

    root, _ = bench
    model = AdscLmms.create_from_arg_string(f"pretrained={yes_no_llava},device=cpu,load_{bits}bit=True,"
                                            "method=adsc,vision_token_budget=12,prune_layers=1;2", {"batch_size": 2})
    layer = (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj, layer)
    assert not any(isinstance(m, layer) for m in model.model.get_vision_tower().modules())
    questions = [json.loads(line) for line in read_lines(f"{root}/pope/llava_pope_test.jsonl")][:4]
    docs = {i: {"image_path": f"{root}/pope/val2014/{q['image']}"} for i, q in enumerate(questions)}
    model.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 1, "temperature": 0, "until": ["<|never|>"]}
    answers = model.generate_until([_instance("generate_until", (q["text"], gen, lambda d: [Image.open(d["image_path"])],
                                                                 i, "t", "test"), i) for i, q in enumerate(questions)])
    question_file = _jsonl(tmp_path / "q.jsonl", questions)
    loader = _loader_answers(yes_no_llava, question_file, f"{root}/pope/val2014", tmp_path / "a.jsonl",
                             [f"--load-{bits}bit", "--prune-method", "adsc", "--vision-token-budget", "12",
                              "--prune-layers", "1,2"])
    assert answers == [loader[(q["question_id"], q["text"])] for q in questions]
