"""Deliberate bugs, one at a time, against the tests that must catch them.

``python scripts/mutation_check.py [--only NAME ...] [--list] [--report FILE]``

Each mutation in ``MUTATIONS`` is one exact text replacement in one source file (the old
text must occur exactly once) and the tests expected to fail under it. The check copies the
tracked files to a scratch folder once, then for each mutation edits the copy, runs its
tests there (``PYTHONPATH`` pointing at the copy, offline, one thread per process) and puts
the file back. A mutation *survives* when its tests all pass: the suite has a hole. The
report is a Markdown table; the exit code is 1 when any mutation survives or no longer
applies (the code changed under it: update its text).

Not part of CI's run (43 bugs, about three minutes on two cores); ``tests/test_mutation_check.py``
checks on every run that each mutation still applies and names existing tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: ``old`` -> ``new`` in ``path`` (relative to the repository),
    expected to fail at least one of ``tests`` (pytest node ids or files)."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str


MUTATIONS: tuple[Mutation, ...] = (
    # ---- ADSC's selection and the solver
    Mutation("select-shift-by-one", "adsc_patch/select.py",
             "        sets[stage] = tuple(int(i) for i in np.flatnonzero(chosen))",
             "        sets[stage] = tuple(min(int(i) + 1, height * width - 1) for i in np.flatnonzero(chosen))",
             ("tests/adsc_patch/test_select_oracle.py",),
             "every kept index of the 2-D selection shifted by one"),
    Mutation("select-cell-centres-shifted", "adsc_patch/select.py",
             "    cells = np.stack([ys + 0.5, xs + 0.5], axis=1)",
             "    cells = np.stack([ys + 0.5, xs + 1.5], axis=1)",
             ("tests/adsc_patch/test_select_oracle.py",),
             "the patch centres one column off, so every chosen patch is its neighbour"),
    Mutation("select-lattice-not-centred", "adsc_patch/select.py",
             "        y = (r + 0.5) * height / rows\n        points.extend((y, (c + 0.5) * width / n) for c in range(n))",
             "        y = r * height / rows\n        points.extend((y, c * width / n) for c in range(n))",
             ("tests/adsc_patch/test_select_oracle.py",),
             "the 2-D lattice starts at the grid's edge instead of cell-centred"),
    Mutation("select-columns-not-centred", "adsc_patch/select.py",
             "(c + 0.5) * width / n",
             "c * width / n",
             ("tests/adsc_patch/test_select_oracle.py",),
             "the lattice's columns alone not centred"),
    Mutation("spread-not-centred", "adsc_patch/select.py",
             "    return [(2 * i + 1) * n // (2 * k) for i in range(k)]",
             "    return [2 * i * n // (2 * k) for i in range(k)]",
             ("tests/adsc_patch/test_select_oracle.py",),
             "the 1-D selection (and the lattice's row shares) at the start of each bin, not its centre"),
    Mutation("reachable-range-floor-off-by-one", "adsc_patch/solve.py",
             "return max(1, math.ceil(lowest - BUDGET_SLACK)), num_tokens",
             "return max(1, math.ceil(lowest - BUDGET_SLACK)) + 1, num_tokens",
             ("tests/llava/test_recorded_schedule.py",),
             "the demo's budget slider starts one above the lowest reachable budget"),
    Mutation("solver-second-closest", "adsc_patch/schedule.py",
             "index, (q, counts, _) = min(feasible, key=key)",
             "index, (q, counts, _) = sorted(feasible, key=key)[1]",
             ("tests/adsc_patch/test_solver_oracle.py",),
             "the solver returns the second-closest schedule"),
    Mutation("solver-aims-high", "adsc_patch/schedule.py",
             "target = Fraction(budget).limit_denominator(10**6)",
             "target = Fraction(budget).limit_denominator(10**6) + Fraction(3, 4)",
             ("tests/adsc_patch/test_solver_oracle.py",),
             "the solver aims 0.75 tokens above the budget"),
    Mutation("solver-tie-break-flipped", "adsc_patch/schedule.py",
             "return (abs(average - target), average > target)",
             "return (abs(average - target), average < target)",
             ("tests/adsc_patch/test_solver_oracle.py",),
             "an exact tie goes to the schedule above the budget"),
    # ---- the pruned decoder's cache and positions
    Mutation("decode-blind-to-last-prompt-token", "adsc_patch/decoder.py",
             "        prefill_mask = state.stage_masks[stage]\n",
             "        prefill_mask = state.stage_masks[stage].clone()\n        prefill_mask[:, -1] = False\n",
             ("tests/llava/test_llava_adsc.py::test_cached_generation_equals_recomputing_the_pruned_forward",
              "tests/llava/test_llava_adsc.py::test_batch_generates_what_each_prompt_generates_alone",
              "tests/adsc_patch/test_patch.py::test_patched_hf_generation_batch_equals_single"),
             "decode steps do not attend to the last prompt token"),
    Mutation("decode-positions-plus-one", "adsc_patch/decoder.py",
             "    positions = _position_rows(position_ids, batch, length, seen, inputs_embeds.device)\n",
             "    positions = _position_rows(position_ids, batch, length, seen, inputs_embeds.device) + 1\n",
             ("tests/llava/test_llava_adsc.py::test_cached_generation_equals_recomputing_the_pruned_forward",
              "tests/adsc_patch/test_patch.py::test_patched_hf_generation_equals_the_uncached_loop_and_caches_the_schedule"),
             "decode steps one position too far"),
    Mutation("survivors-renumbered", "adsc_patch/decoder.py",
             "    renumber = plan.rule.renumbers_positions\n",
             "    renumber = True\n",
             ("tests/llava/test_llava_adsc.py::test_pruned_forward_equals_slow_reference",
              "tests/adsc_patch/test_patch.py::test_patched_hf_logits_equal_a_slow_loop_over_transformers_own_layers"),
             "ADSC and FastV survivors renumbered contiguously (only PyramidDrop's release does)"),
    Mutation("pdrop-keeps-original-ids", "adsc_patch/decoder.py",
             "    renumber = plan.rule.renumbers_positions\n",
             "    renumber = False\n",
             ("tests/adsc_patch/test_pdrop.py",),
             "PyramidDrop's survivors keep their original position ids (its release renumbers them)"),
    # ---- entry points
    Mutation("recorded-layers-ignored", "adsc_patch/resolve.py",
             "recorded_here = recorded_layers(host, recorded, method)", "recorded_here = ()",
             ("tests/llava/test_recorded_schedule.py",),
             "another method on a fine-tuned checkpoint takes its default layers, not the checkpoint's"),
    Mutation("prefill-kv-counts-the-answer", "llava/serve/chat.py",
             "prefill_kv_mb=cache_nbytes(cache, without_last=max(new_tokens - 1, 0)) / 1e6",
             "prefill_kv_mb=cache_nbytes(cache) / 1e6",
             ("tests/llava/test_serve.py::test_reply_equals_uncached_greedy_decoding_and_metrics_match_the_profile",),
             "the demo's prefill KV includes the answer's positions"),
    Mutation("session-ignored", "adsc_patch/patch.py",
             "    session = active_session(language_model)\n",
             "    session = None\n",
             ("tests/adsc_patch/test_session.py",),
             "a llava-hf call inside pruning(model, spec) does not prune by the session's spec"),
    Mutation("budget-fraction-of-the-wrong-count", "adsc_patch/spec.py",
             "            return self.budget_fraction * num_tokens",
             "            return self.budget_fraction * (num_tokens - 1)",
             ("tests/adsc_patch/test_spec.py",),
             "a budget fraction taken of one token fewer than the image has"),
    # ---- the playground's data and scorer
    Mutation("eval-grids-from-training-digits", "playground/digitgrid.py",
             'grid = random_grid(rng, "eval")', 'grid = random_grid(rng, "train")',
             ("tests/playground/test_digitgrid_written.py",),
             "evaluation grids drawn from the training digits"),
    Mutation("training-grids-from-eval-digits", "playground/digitgrid.py",
             'grid = random_grid(rng, "train")', 'grid = random_grid(rng, "eval")',
             ("tests/playground/test_digitgrid_written.py",),
             "training grids drawn from the evaluation digits"),
    Mutation("count-ignores-a-cell", "playground/digitgrid.py",
             "count = sum(c == digit for c in grid.cells)", "count = sum(c == digit for c in grid.cells[1:])",
             ("tests/playground/test_digitgrid_written.py",),
             "the count answer ignores the first cell"),
    Mutation("scorer-keeps-final-period", "llava/eval/eval_digitgrid.py",
             'return text.strip().rstrip(".").strip().lower()', "return text.strip().strip().lower()",
             ("tests/llava/eval/test_eval_digitgrid.py",),
             "a short answer's final period is not stripped"),
    Mutation("scorer-keeps-transcription-period", "llava/eval/eval_digitgrid.py",
             'rows = [row.split() for row in text.strip().rstrip(".").split(";")]',
             'rows = [row.split() for row in text.strip().split(";")]',
             ("tests/llava/eval/test_eval_digitgrid.py",),
             "a transcription's final period is not stripped"),
    # ---- loading
    Mutation("lora-ignored-at-load", "llava/model/builder.py",
             "return model.merge_and_unload()", "return model.unload()",
             ("tests/llava/test_builder.py",),
             "a LoRA output loads as its base (the adapter dropped, not merged)"),
    # ---- FastV
    Mutation("fastv-second-to-last-query", "adsc_patch/scores.py",
             "    return torch.where(slot_mask, arange, -1).max(dim=1).values\n",
             "    return (torch.where(slot_mask, arange, -1).max(dim=1).values - 1).clamp(min=0)\n",
             ("tests/adsc_patch/test_fastv.py::test_the_pruned_loop_keeps_the_top_k_of_the_eager_attention",),
             "FastV ranks with the second-to-last prompt token"),
    Mutation("fastv-ranks-at-layer-k", "adsc_patch/fastv.py",
             "    return prune_layer - 1\n",
             "    return prune_layer\n",
             ("tests/adsc_patch/test_fastv.py::test_the_pruned_loop_keeps_the_top_k_of_the_eager_attention",),
             "FastV ranks by layer K's attention instead of layer K-1's"),
    # ---- the method registry
    Mutation("registered-method-ignored", "adsc_patch/decoder.py",
             "    sets = plan.rule.keep_sets(num_tokens, counts, plan.selection, grid)\n",
             "    sets = get_method(\"adsc\").keep_sets(num_tokens, counts, plan.selection, grid)\n",
             ("tests/test_registered_method.py",),
             "a registered positional method runs ADSC's survivors instead of its own"),
    Mutation("per-image-grid-ignored", "adsc_patch/decoder.py",
             "            spans.append((positions, grid))\n",
             "            spans.append((positions, None))\n",
             ("tests/adsc_patch/test_decoder.py::test_images_of_different_sizes_each_keep_their_own_lattice",),
             "images of different sizes lose their own grids (the 1-D stride instead of each one's lattice)"),
    Mutation("mrope-axes-not-gathered", "adsc_patch/decoder.py",
             "            positions = positions.gather(2, src[None].expand(positions.shape[0], -1, -1))",
             "            positions = positions[:1].gather(2, src[None]).expand(positions.shape[0], -1, -1)",
             ("tests/adsc_patch/test_qwen_vl.py",),
             "M-RoPE survivors keep only their text position on every axis (the t, h, w rows not gathered)"),
    Mutation("mrope-renumbering-twice", "adsc_patch/decoder.py",
             "                positions = (original - dropped[None]).masked_fill(~slot_mask[None], 0)",
             "                positions = (positions - dropped[None]).masked_fill(~slot_mask[None], 0)",
             ("tests/adsc_patch/test_qwen_vl.py",),
             "PyramidDrop on M-RoPE subtracts earlier stages' drops a second time"),
    Mutation("deepstack-on-dropped-slots", "adsc_patch/decoder.py",
             "            hidden = hidden + gathered * (slot_index >= 0)[..., None].to(gathered.dtype)",
             "            hidden = hidden + add[:, -hidden.shape[1]:]",
             ("tests/adsc_patch/test_qwen_vl.py",),
             "Qwen3-VL's DeepStack features added by slot, not by each survivor's input position"),
    Mutation("qk-norms-skipped-in-ranking", "adsc_patch/scores.py",
             "        q, k = attention.q_norm(q), attention.k_norm(k)",
             "        pass",
             ("tests/adsc_patch/test_qwen_vl.py",),
             "the score-based methods rank without Qwen3's per-head q/k norms"),
    Mutation("llava-next-crop-grid-transposed", "adsc_patch/adapters.py",
             "                    row_spans.append((tuple(crops), (len(lines), widths.pop())))",
             "                    row_spans.append((tuple(crops), (widths.pop(), len(lines))))",
             ("tests/adsc_patch/test_llava_next.py",),
             "LLaVA-NeXT's crop grid read as cols x rows (the lattice laid over the wrong shape)"),
    Mutation("prune-keeps-an-extra-slot", "adsc_patch/decoder.py",
             "    new_length = int(keep.sum(1).max())",
             "    new_length = int(keep.sum(1).max()) + 1",
             ("tests/adsc_patch/test_qwen_vl.py::test_each_layers_cache_holds_the_text_and_its_stages_vision_tokens",),
             "each prune keeps one masked slot too many: logits unchanged, every later layer's cache longer"),
    # ---- transformers' own VLMs in our entry points
    Mutation("vlm-prompts-right-padded", "llava/model/vlm.py",
             'padding=True, padding_side="left"',
             'padding=True, padding_side="right"',
             ("tests/llava/test_vlm_entry_points.py::test_a_left_padded_batch_of_prompts_gives_each_prompts_own_logits",),
             "a batch of prompts padded on the right: generation continues after the shorter rows' padding"),
    Mutation("vlm-mean-vision-tokens-of-row-0", "llava/model/vlm.py",
             "trace.tokens_per_layer[row].float().mean() - text[row])",
             "trace.tokens_per_layer[row].float().mean() - text[0])",
             ("tests/llava/test_vlm_entry_points.py::test_the_benchmark_loader_answers_a_batch_as_each_question_alone_and_resumes",),
             "every answer's mean vision tokens taken with the first prompt's text length"),
    Mutation("vlm-user-turns-labelled", "llava/train/vlm_data.py",
             "        labels += list(piece) if answer else [IGNORE_INDEX] * len(piece)",
             "        labels += list(piece)",
             ("tests/llava/test_train_vlm.py::test_exactly_the_assistant_tokens_are_labelled",),
             "the fine-tune of a transformers VLM learns the prompt too (every token labelled)"),
    Mutation("vlm-lora-on-the-vision-tower", "llava/train/vlm_train.py",
             "    return re.escape(_module_name(model, adapter_for(model).language_model(model))) + _DECODER_LINEARS",
             "    return [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
             ("tests/llava/test_train_vlm.py::test_lora_steps_lower_the_loss_and_change_only_lora_and_merger_weights",),
             "LoRA targets by bare module names (as upstream), which reach the vision tower's MLPs too"),
    Mutation("lmms-pruning-ignored", "llava/eval/lmms_adsc.py",
             "                apply_pruning_args(self.model, flags)",
             "                pass",
             ("tests/llava/eval/test_lmms_eval.py::test_llava_through_lmms_eval_scores_as_our_scorers_and_answers_as_our_loader",),
             "lmms-eval's model drops the pruning arguments of a LLaVA-1.5 checkpoint"),
    Mutation("lmms-loglikelihood-shifted", "llava/eval/lmms_adsc.py",
             "        predicted = logits[0, -n - 1:-1].float().log_softmax(-1)",
             "        predicted = logits[0, -n:].float().log_softmax(-1)",
             ("tests/llava/eval/test_lmms_eval.py::test_loglikelihood_is_the_first_generated_steps_log_probability",),
             "each continuation token scored by the logits at its own position instead of the one before"),
    Mutation("vlm-chat-cost-unpruned", "llava/serve/vlm_chat.py",
             "            schedules = tuple(plan.schedule(self.num_layers, n) for n in image.grid_tokens)",
             "            schedules = (None,) * len(image.grids)",
             ("tests/llava/test_vlm_entry_points.py::test_the_demos_compare_api_answers_both_sides_as_the_stock_model",),
             "the demo's FLOPs for a pruned reply worked out as if nothing were pruned"),
    # ---- the playground on Qwen2.5-VL (images of varying size)
    Mutation("qwen-token-cells-transposed", "playground/tower.py",
             '    grid_rows, grid_cols = np.meshgrid(cell_row, cell_col, indexing="ij")',
             '    grid_rows, grid_cols = np.meshgrid(cell_row, cell_col, indexing="xy")',
             ("tests/playground/test_study_qwen.py::test_tokens_per_image_and_token_cells_by_hand",),
             "the tower's labels of a non-square token grid laid out column-major"),
    Mutation("qwen-report-cost-of-one-size", "playground/report.py",
             "        for width, height in sizes:",
             "        for width, height in sizes[:1] * len(sizes):",
             ("tests/playground/test_study_qwen.py::test_the_report_costs_are_what_each_call_ran_and_the_profilers",),
             "the Qwen report's FLOPs, KV and tokens priced for the first evaluation image's size only"),
    Mutation("qwen-share-of-a-fixed-size", "playground/study.py",
             "                tokens = image_tokens(*image.size, self.config.image_sizes)",
             "                tokens = image_tokens(144, 144, self.config.image_sizes)",
             ("tests/playground/test_study_qwen.py::test_the_report_costs_are_what_each_call_ran_and_the_profilers",),
             "each answer's vision tokens taken as a share of a 144 x 144 image's, whatever its size"),
)


def _copy_tracked(destination: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)) or destination, exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


def check_applies(mutation: Mutation, root: str = ROOT) -> str | None:
    """``None`` when ``mutation`` applies to the files under ``root``, else why not."""
    path = os.path.join(root, mutation.path)
    if not os.path.isfile(path):
        return f"{mutation.path} does not exist"
    with open(path, encoding="utf-8") as f:
        count = f.read().count(mutation.old)
    if count != 1:
        return f"its old text occurs {count} times in {mutation.path} (must be once)"
    for test in mutation.tests:
        if not os.path.exists(os.path.join(root, test.split("::")[0])):
            return f"test {test} does not exist"
    return None


def _run(mutation: Mutation, copy: str) -> tuple[str, float, str]:
    """``(outcome, seconds, last line of pytest)``: outcome caught, survived or stale."""
    problem = check_applies(mutation, copy)
    if problem:
        return "stale", 0.0, problem
    path = os.path.join(copy, mutation.path)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(original.replace(mutation.old, mutation.new))
    env = dict(os.environ, PYTHONPATH=copy, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=copy, env=env, capture_output=True, text=True)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    outcome = "survived" if done.returncode == 0 else "caught"
    return outcome, time.perf_counter() - start, lines[-1] if lines else done.stderr.strip()[-200:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/mutation_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--report", default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug} ({m.path}; {', '.join(m.tests)})")
        return 0
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as copy:
        _copy_tracked(copy)
        for m in chosen:
            outcome, seconds, last = _run(m, copy)
            bad += outcome != "caught"
            print(f"{outcome:8s} {m.name} ({seconds:.0f} s): {last}", flush=True)
            rows.append(f"| {m.name} | {m.bug} | {outcome} | {seconds:.0f} | {last} |")
    report = "\n".join(["| mutation | bug | outcome | s | tests' last line |", "|---|---|---|---|---|", *rows])
    print(report)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
