"""ADSC through LlavaLlamaForCausalLM's config hook: forward, loss, generate, cache, gradients."""

import copy

import pytest
import torch
from transformers import LlamaModel

from adsc_patch import compact_labels, compat
from adsc_patch.cache import cache_layer_lengths, cache_nbytes
from adsc_patch.profile import DecoderShape, kv_cache_bytes
from adsc_patch.select import keep_sets
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range


@pytest.fixture(scope="module")
def deep(tiny_deep_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    return tokenizer, model, processor


def _batch(tokenizer, model, processor, images, side="left"):
    """Three rows: image first, image last (different offset), and a text-only row."""
    seqs = [
        prompt_ids(tokenizer, QUESTIONS[0]),
        prompt_ids(tokenizer, QUESTIONS[1], image_first=False),
        tokenizer("A text-only prompt without any picture at all.", return_tensors="pt").input_ids[0],
    ]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    pixels = process_images(images[:2], processor, model.config)
    return seqs, ids, mask, pixels


def _reference_logits(model, seq, pixels):
    """One prompt, by hand: splice, then run layer by layer gathering survivors."""
    inner = model.model
    plan = inner.adsc_plan()
    spliced = model.prepare_inputs_labels_for_multimodal(seq[None], None, None, pixels)
    embeds, vision = spliced.inputs_embeds, spliced.vision_mask[0]
    n_image = inner.get_vision_tower().num_patches
    schedule = plan.schedule(model.config.num_hidden_layers, n_image)
    kept_local = keep_sets(n_image, schedule.stage_tokens[1:], plan.selection, plan.grid)
    starts = [i for i in range(vision.shape[0]) if vision[i] and (i == 0 or not vision[i - 1])]
    index = torch.arange(vision.shape[0])
    hidden = embeds
    for layer_idx, layer in enumerate(inner.layers):
        if layer_idx in plan.prune_layers:
            stage = plan.prune_layers.index(layer_idx)
            dropped = {s + i for s in starts for i in range(n_image)} - {s + i for s in starts for i in kept_local[stage]}
            keep = torch.tensor([int(i) not in dropped for i in index])
            hidden, index = hidden[:, keep], index[keep]
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=inner.rotary_emb(hidden, index[None]))
    return model.lm_head(inner.norm(hidden))[0]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pruned_forward_equals_slow_reference(deep, random_images, impl, side):
    tokenizer, model, processor = deep
    model = copy.deepcopy(model)
    model.config._attn_implementation = impl
    model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, random_images, side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, images=pixels)
        pixel_of_row = [pixels[0:1], pixels[1:2], None]
        for row, seq in enumerate(seqs):
            if pixel_of_row[row] is None:  # text only: transformers' own Llama forward
                ref = model.lm_head(LlamaModel.forward(model.model, input_ids=seq[None]).last_hidden_state)[0]
            else:
                ref = _reference_logits(model, seq, pixel_of_row[row])
            torch.testing.assert_close(out.logits[row, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] < ids.shape[1] + 2 * 36  # the sequence really shrank


def test_zero_ratio_or_no_layers_is_the_unpruned_model(deep, random_images):
    tokenizer, model, processor = deep
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, random_images)
    model.configure_pruning(prune_layers=[], drop_ratio=0.0)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, images=pixels).logits
        base_gen = model.generate(ids, images=pixels, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for layers, ratio in (([2, 5], 0.0), ([], 0.0)):
            model.configure_pruning(prune_layers=layers, drop_ratio=ratio)
            assert torch.equal(model(input_ids=ids, attention_mask=mask, images=pixels).logits, base)
            gen = model.generate(ids, images=pixels, attention_mask=mask, max_new_tokens=6, do_sample=False)
            assert torch.equal(gen, base_gen)


def test_loss_covers_the_same_text_targets_as_without_pruning(deep, random_images):
    tokenizer, model, processor = deep
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, random_images, side="right")
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels)
        # recompute by hand from the compact logits: each text target predicted by the previous slot
        spliced = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, pixels)
        compact = compact_labels(spliced.labels, out.token_positions)
        targets = compact[:, 1:]
        # the same targets, each once (right padding: position 0 is never a target)
        assert sorted(targets[targets != -100].tolist()) == sorted(
            spliced.labels[:, 1:][spliced.labels[:, 1:] != -100].tolist()
        )
        assert (targets != -100).sum() == (spliced.labels[:, 1:] != -100).sum()
        manual = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(out.loss, manual)
    finally:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)


def _greedy_without_cache(model, ids, pixels, steps):
    tokens = []
    for _ in range(steps):
        current = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])[None]
        logits = model(input_ids=current, images=pixels, use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def _assert_steps_equal_uncached(model, seq, pixels, tokens, step_logits, atol=1e-4):
    """Each generated step's logits equal one uncached forward over ``seq`` + the tokens before
    it (the model's own forward on the whole sequence: no cache, no decode path)."""
    assert len(step_logits) == len(tokens)
    for step, logits in enumerate(step_logits):
        current = torch.cat([seq, torch.tensor(tokens[:step], dtype=torch.long, device=seq.device)])[None]
        with torch.no_grad():
            expected = model(input_ids=current, images=pixels, use_cache=False).logits[0, -1]
        torch.testing.assert_close(logits.float(), expected.float(), atol=atol, rtol=atol,
                                   msg=lambda m: f"step {step}: {m}")


GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("selection", ["uniform_2d", "uniform_1d"])
def test_cached_generation_equals_recomputing_the_pruned_forward(deep, random_images, selection):
    tokenizer, model, processor = deep
    model.configure_pruning(prune_layers=[1, 3, 6], vision_token_budget=12, selection=selection)
    try:
        pixels = process_images(random_images[:1], processor, model.config)
        seq = prompt_ids(tokenizer, QUESTIONS[2])
        with torch.no_grad():
            out = model.generate(seq[None], images=pixels, **GREEDY)
            uncached = _greedy_without_cache(model, seq, pixels, 8)
        assert out.sequences[0].tolist() == uncached
        _assert_steps_equal_uncached(model, seq, pixels, uncached, [step[0] for step in out.logits])
    finally:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0, selection="uniform_2d")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_batch_generates_what_each_prompt_generates_alone(deep, random_images, impl):
    """Every row of a left-padded batch, step by step, against its own prompt's uncached forward."""
    tokenizer, model, processor = deep
    model = copy.deepcopy(model)
    model.config._attn_implementation = impl
    model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.6)
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, random_images, side="left")
    with torch.no_grad():
        batched = model.generate(ids, images=pixels, attention_mask=mask, **GREEDY)
    pixel_of_row = [pixels[0:1], pixels[1:2], None]
    for row in range(3):
        tokens = batched.sequences[row].tolist()
        _assert_steps_equal_uncached(model, seqs[row], pixel_of_row[row], tokens,
                                     [step[row] for step in batched.logits])


def test_backends_agree_on_generated_tokens(deep, random_images):
    """eager and SDPA each, step by step, against the uncached eager forward of each prompt."""
    tokenizer, model, processor = deep
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"
    reference.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    outputs = []
    for impl in ("eager", "sdpa"):
        m = copy.deepcopy(model)
        m.config._attn_implementation = impl
        m.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
        seqs, ids, mask, pixels = _batch(tokenizer, m, processor, random_images)
        with torch.no_grad():
            out = m.generate(ids, images=pixels, attention_mask=mask, **GREEDY)
        pixel_of_row = [pixels[0:1], pixels[1:2], None]
        for row in range(3):
            _assert_steps_equal_uncached(reference, seqs[row], pixel_of_row[row], out.sequences[row].tolist(),
                                         [step[row] for step in out.logits])
        outputs.append(out.sequences)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs CUDA and flash-attn")
def test_flash_attention_2_generates_the_same_tokens(deep, random_images):
    """FlashAttention-2 step logits against the uncached SDPA forward of each prompt (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    tokenizer, model, processor = deep
    reference = copy.deepcopy(model).to("cuda", torch.bfloat16)
    reference.config._attn_implementation = "sdpa"
    reference.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    m = copy.deepcopy(model).to("cuda", torch.bfloat16)
    m.config._attn_implementation = "flash_attention_2"
    m.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    seqs, ids, mask, pixels = _batch(tokenizer, m, processor, random_images)
    with torch.no_grad():
        out = m.generate(ids.cuda(), images=pixels.cuda(), attention_mask=mask.cuda(), **GREEDY)
    pixel_of_row = [pixels[0:1].cuda(), pixels[1:2].cuda(), None]
    for row in range(3):
        _assert_steps_equal_uncached(reference, seqs[row].cuda(), pixel_of_row[row], out.sequences[row].tolist(),
                                     [step[row].float() for step in out.logits], atol=5e-2)


def test_cache_after_prefill_follows_the_schedule(deep, random_images):
    tokenizer, model, processor = deep
    schedule = model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    try:
        seq = prompt_ids(tokenizer, QUESTIONS[0])
        pixels = process_images(random_images[:1], processor, model.config)
        with torch.no_grad():
            out = model(input_ids=seq[None], images=pixels, use_cache=True)
        text = len(seq) - 1  # the marker is replaced by the image
        expected = [text + n for n in schedule.tokens_per_layer]
        assert schedule.stage_tokens == (36, 18, 9)
        assert cache_layer_lengths(compat.output_cache(out)) == expected
        shape = DecoderShape.from_config(model.config)
        assert cache_nbytes(compat.output_cache(out)) == kv_cache_bytes(shape, expected, bytes_per_value=4)
        trace = model.pruning_trace
        assert [len(p[0]) for p in trace.kept_vision_positions] == [36, 18, 9]
        assert trace.tokens_per_layer[0].tolist() == expected
        first_image = int(trace.kept_vision_positions[0][0][0])
        local = [int(p) - first_image for p in trace.kept_at(5)[0]]
        assert tuple(local) == keep_sets(36, (18, 9), "uniform_2d", (6, 6))[1]
    finally:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)


def test_config_hook_round_trips_through_save(deep, tmp_path):
    tokenizer, model, processor = deep
    model.configure_pruning(prune_layers=[1, 4], vision_token_budget=20)
    try:
        model.config.save_pretrained(tmp_path)
        from llava.model import LlavaConfig

        loaded = LlavaConfig.from_pretrained(tmp_path)
        assert loaded.prune_layers == [1, 4]
        assert loaded.drop_ratio == model.config.drop_ratio > 0
        assert loaded.vision_token_budget == 20
        assert abs(model.vision_schedule().average_tokens - 20) <= 1
    finally:
        model.configure_pruning(prune_layers=[], drop_ratio=0.0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_reaches_lora_and_projector(deep, random_images, checkpointing):
    grads = _lora_grads(deep, random_images, checkpointing)
    assert grads["projector"].abs().sum() > 0
    assert grads["lora"].abs().sum() > 0


def test_gradients_equal_with_and_without_checkpointing(deep, random_images):
    plain = _lora_grads(deep, random_images, False)
    checkpointed = _lora_grads(deep, random_images, True)
    for key in plain:
        torch.testing.assert_close(plain[key], checkpointed[key], atol=1e-6, rtol=1e-5)


def _lora_grads(deep, images, checkpointing):
    from peft import LoraConfig, get_peft_model

    tokenizer, model, processor = deep
    model = copy.deepcopy(model)
    model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", init_lora_weights=False)
    with compat.peft_without_alias_warnings():
        peft_model = get_peft_model(model, lora)
    model.model.mm_projector.requires_grad_(True)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert model.model.layers[0].gradient_checkpointing
    peft_model.train()
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, images, side="right")
    labels = ids.clone()
    labels[(mask == 0) | (ids == IMAGE_TOKEN_INDEX)] = IGNORE_INDEX
    out = peft_model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels)
    out.loss.backward()
    lora_grad = torch.cat(
        [p.grad.flatten() for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    )
    projector_grad = torch.cat([p.grad.flatten() for p in model.model.mm_projector.parameters()])
    assert not any("vision_tower" in n for n, p in peft_model.named_parameters() if "lora_" in n)
    return {"lora": lora_grad, "projector": projector_grad}


@pytest.mark.parametrize("name", compat.CACHE_NAMES)
def test_checkpointed_training_never_writes_a_given_cache(deep, random_images, caplog, name):
    """The backward replay of a checkpointed layer would write the cache a second time."""
    from transformers import DynamicCache

    from adsc_patch import decoder

    tokenizer, model, processor = deep
    model = copy.deepcopy(model)
    model.configure_pruning(prune_layers=[2, 5], drop_ratio=0.5)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seqs, ids, mask, pixels = _batch(tokenizer, model, processor, random_images, side="right")
    labels = ids.clone()
    labels[(mask == 0) | (ids == IMAGE_TOKEN_INDEX)] = IGNORE_INDEX
    cache = DynamicCache(config=model.config)
    decoder._warn_once.cache_clear()
    out = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels, use_cache=True, **{name: cache})
    out.loss.backward()
    assert cache.get_seq_length(0) == 0 and compat.output_cache(out) is None
    assert "gradient checkpointing in training" in caplog.text
