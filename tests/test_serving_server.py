"""serving.server AdapterServer: per-row adapters in one batch, identical to PEFT run prompt by
prompt; base-rewriting inits (PiSSA, OLoRA, …) served as PEFT loads them or refused."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from adaptr.errors import InvalidAdapterError, InvalidInputError
from adaptr.registry import Registry
from adaptr.serving import AdapterServer
from adaptr.tiny import save_tiny_base

from helpers import random_lora

PROMPTS = ["Hello there", "你好", "Quote: Knowledge is power", "x", "Translate: cat"]


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "qwen2"])
def setup(request, tmp_path_factory):
    from adaptr.registry import Registry

    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    base = save_tiny_base(root / "base", request.param, initializer_range=0.2)
    if request.param == "gpt_neox":
        targets = (["query_key_value"], ["query_key_value", "dense", "dense_4h_to_h"])
    else:
        targets = (["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"])
    reg = Registry(root / "home")
    reg.add_base("base", base)
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=targets[0]),
        "b": dict(r=8, lora_alpha=32, target_modules=targets[1]),
        "c": dict(r=2, lora_alpha=4, target_modules=targets[1], use_rslora=True),
    }
    for i, (name, spec) in enumerate(specs.items()):
        reg.add(name, random_lora(base, root / name, 100 + i, **spec), base="base")
    return reg, base


def _peft_alone(reg, base, ref, prompt, tokenizer, max_new_tokens=6):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if ref is not None:
        model = PeftModel.from_pretrained(
            model, reg.export(ref, reg.home.parent / f"exp-{ref}", force=True)
        ).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return logits, tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_mixed_batch_matches_peft_prompt_by_prompt(setup):
    reg, base = setup
    server = AdapterServer(reg, "base", max_adapters=4)
    adapters = ["a", "b", None, "c", "b"]
    logits, mask = server.logits(PROMPTS, adapters)
    texts = server.generate(PROMPTS, adapters, max_new_tokens=6)
    for i, (prompt, ref) in enumerate(zip(PROMPTS, adapters, strict=True)):
        want_logits, want_text = _peft_alone(reg, base, ref, prompt, server.tokenizer)
        assert (logits[i, -1] - want_logits).abs().max() < 1e-4, (prompt, ref)
        assert texts[i] == want_text, (prompt, ref)
    _, bare = _peft_alone(reg, base, None, PROMPTS[0], server.tokenizer)
    _, with_a = _peft_alone(reg, base, "a", PROMPTS[0], server.tokenizer)
    assert bare != with_a  # the adapters really change the output


def test_gathering_on_every_call_and_expanded_batches_give_the_same_answers(setup):
    reg, _ = setup
    adapters = ["a", "b", None, "c", "b"]
    kept = AdapterServer(reg, "base", max_adapters=4)
    fresh = AdapterServer(reg, "base", max_adapters=4, gather_budget_mb=0)  # re-gathers per call
    assert torch.equal(kept.logits(PROMPTS, adapters)[0], fresh.logits(PROMPTS, adapters)[0])
    assert kept.generate(PROMPTS, adapters, max_new_tokens=5) == fresh.generate(
        PROMPTS, adapters, max_new_tokens=5
    )
    beams = {"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2}
    together = kept.generate(PROMPTS, adapters, **beams)  # generate() expands the rows 2x
    alone = [
        t for p, a in zip(PROMPTS, adapters, strict=True) for t in kept.generate([p], [a], **beams)
    ]
    assert len(together) == 2 * len(PROMPTS) and together == alone


def test_rows_grouped_by_adapter_give_the_same_answers(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=4)
    prompts, adapters = PROMPTS * 2, ["a", "b", None, "c", "b"] * 2  # grouped: runs of 2, 2, 4, 2
    alone = [
        server.generate([p], [a], max_new_tokens=5)[0]
        for p, a in zip(prompts, adapters, strict=True)
    ]
    assert server.generate(prompts, adapters, max_new_tokens=5) == alone
    logits, _ = server.logits(prompts, adapters)
    # fp32 logits of magnitude ~5 from a different grouping of rows (other matmul blocking):
    # equal up to summation order, i.e. a few ulps of 5 (~5e-7 each); 1e-4 bounds that loosely
    assert torch.allclose(logits[:5], server.logits(PROMPTS, adapters[:5])[0], rtol=0, atol=1e-4)
    assert torch.allclose(logits[5:], logits[:5], rtol=0, atol=1e-4)
    with server.batch(adapters, len(adapters), grouped=True) as order:
        assert [adapters[i] for i in order] == [None] * 2 + ["a"] * 2 + ["b"] * 4 + ["c"] * 2
        enc = server.tokenizer([prompts[i] for i in order], return_tensors="pt", padding=True)
        server.model(**enc)
        gathered = [g for g in server.state.cache.values() if not g.empty]
        assert gathered and all(g.A.shape[0] == 5 for g in gathered)  # 10 rows, blocks of 2


def test_row_aware_generate_arguments_keep_the_callers_order(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=4)
    vocab = list(range(len(server.tokenizer)))
    forced = server.tokenizer.convert_tokens_to_ids(server.tokenizer.tokenize("x"))[0]

    def only_x_for_the_first(batch_id, ids):  # sees rows by position
        return [forced] if batch_id == 0 else vocab

    texts = server.generate(
        ["Hello there", "Translate: cat"],
        ["c", "a"],  # grouped, these rows would swap
        max_new_tokens=3,
        prefix_allowed_tokens_fn=only_x_for_the_first,
    )
    assert texts[0] == server.tokenizer.decode([forced] * 3) != texts[1]


def test_switch_default_and_lru_eviction(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=2)
    server.switch("a")
    assert server.default == "a@1" and server.resident() == ["a@1"]
    default_out = server.generate(["Hello there"], max_new_tokens=4)
    assert default_out == server.generate(["Hello there"], ["a"], max_new_tokens=4)
    server.load("b")
    server.load("c")  # evicts a (least recently used)
    assert server.resident() == ["b@1", "c@1"]
    assert (
        server.generate(["Hello there"], ["a"], max_new_tokens=4) == default_out
    )  # reloaded on demand
    assert server.resident() == ["c@1", "a@1"]
    server.switch(None)
    assert server.generate(["Hello there"], max_new_tokens=4) == server.generate(
        ["Hello there"], [None], max_new_tokens=4
    )


def test_threads_share_one_server(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=3)
    expected = {
        ref: server.generate(["Hello there"], [ref], max_new_tokens=4)[0] for ref in ("a", "b", "c")
    }
    results, errors = [], []

    def worker(ref):
        try:
            for _ in range(3):
                results.append((ref, server.generate(["Hello there"], [ref], max_new_tokens=4)[0]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in ("a", "b", "c", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a generate() call hung"
    assert not errors and len(results) == 12
    assert all(text == expected[ref] for ref, text in results)


def test_refusals(setup, tmp_path):
    reg, base = setup
    server = AdapterServer(reg, "base", max_adapters=2)
    with pytest.raises(InvalidInputError, match="2 adapter\\(s\\) for 1 prompt"):
        server.generate(["x"], ["a", "a"])
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    neox = "gpt_neox" in str(reg.base_path("base"))
    targets = ["query_key_value", "dense_4h_to_h"] if neox else ["k_proj", "down_proj"]
    ia3 = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        IA3Config(target_modules=targets, feedforward_modules=targets[1:]),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    reg.add("ia3", tmp_path / "ia3", base="base")
    try:
        with pytest.raises(InvalidInputError, match="is a IA3 adapter; AdapterServer serves LoRA"):
            server.load("ia3")
    finally:
        reg.remove("ia3")


def test_adapters_the_stacks_cannot_hold_are_served_by_peft_in_the_same_batch(setup, tmp_path):
    reg, base = setup
    neox = "gpt_neox" in str(reg.base_path("base"))
    lin = ["query_key_value"] if neox else ["q_proj", "v_proj"]
    emb, norm = ("embed_in", "final_layer_norm") if neox else ("embed_tokens", "norm")
    specs = {
        "dora": dict(r=2, target_modules=lin, use_dora=True),
        "bias": dict(r=2, target_modules=lin, lora_bias=True),
        "norm": dict(r=2, target_modules=lin, modules_to_save=[norm]),
        "head": dict(r=2, target_modules=lin, modules_to_save=["lm_head"]),
        "embed": dict(r=4, target_modules=[emb, lin[0]]),
        "big": dict(r=8, lora_alpha=16, target_modules=lin),  # above max_rank=4 here
    }
    for i, (name, spec) in enumerate(specs.items()):
        reg.add(name, random_lora(base, tmp_path / name, 50 + i, **spec), base="base")
    try:
        server = AdapterServer(reg, "base", max_adapters=9, max_rank=4)
        prompts = PROMPTS + ["abc", "zz", "hm", "Hello there"]
        adapters = ["a", "dora", "bias", None, "norm", "embed", "big", "head", "c"]
        # PEFT cannot mix DoRA or a saved norm with other adapters: those run apart
        assert server.partition(adapters, 9) == [[0, 2, 3, 5, 6, 7, 8], [1], [4]]
        texts = server.generate(prompts, adapters, max_new_tokens=6)
        logits, _ = server.logits(prompts, adapters)
        assert sorted(server.served_by_peft()) == sorted(f"{n}@1" for n in specs)
        for i, (prompt, ref) in enumerate(zip(prompts, adapters, strict=True)):
            want_logits, want_text = _peft_alone(reg, base, ref, prompt, server.tokenizer)
            assert texts[i] == want_text, (prompt, ref)
            assert (logits[i, -1] - want_logits).abs().max() < 1e-4, (prompt, ref)
        beams = {"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2}
        alone = [
            t
            for p, a in zip(prompts, adapters, strict=True)
            for t in server.generate([p], [a], **beams)
        ]
        assert server.generate(prompts, adapters, **beams) == alone
        with pytest.raises(InvalidInputError, match="run apart"), server.batch(adapters, 9):
            pass
        # PEFT's layers add nothing to a batch of stacked adapters only
        plain = AdapterServer(reg, "base", max_adapters=4)
        assert server.generate(PROMPTS, ["a", "b", None, "c", "b"], max_new_tokens=6) == (
            plain.generate(PROMPTS, ["a", "b", None, "c", "b"], max_new_tokens=6)
        )
        # evicted from PEFT like any other adapter, and loaded back on demand
        small = AdapterServer(reg, "base", max_adapters=2, max_rank=4)
        first = small.generate(prompts[:3], ["dora"] * 3, max_new_tokens=6)
        small.load("embed")
        small.load("a")
        assert small.resident() == ["embed@1", "a@1"] and small.served_by_peft() == ["embed@1"]
        assert "dora@1" not in small.fallback.peft.peft_config
        assert small.generate(prompts[:3], ["dora"] * 3, max_new_tokens=6) == first
    finally:
        for name in specs:
            reg.remove(name)


def test_streaming_and_chat(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=3)
    whole = server.generate(["Hello there"], ["b"], max_new_tokens=8)[0]
    pieces = list(server.stream("Hello there", "b", max_new_tokens=8))
    assert "".join(pieces) == whole and len(pieces) >= 1
    server.switch("a")
    assert (
        "".join(server.stream("Hello there", max_new_tokens=8))
        == server.generate(["Hello there"], max_new_tokens=8)[0]
    )
    conv = [{"role": "user", "content": "你好"}]
    prompt = server.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert server.chat([conv], ["b"], max_new_tokens=5) == server.generate(
        [prompt], ["b"], max_new_tokens=5
    )


def test_buffers_grow_with_what_is_loaded(setup):
    reg, _ = setup
    server = AdapterServer(reg, "base", max_adapters=50)
    server.load("a")
    sizes = {name: (layer.A.shape[0], layer.A.shape[2]) for name, layer in server.slots.layers.items()}
    assert all(cap <= 4 and rank == 4 for cap, rank in sizes.values())  # not 51 slots x max_rank 64
    server.load("b")  # rank 8 and more modules
    assert max(layer.A.shape[2] for layer in server.slots.layers.values()) == 8


def test_memory_bound_evicts_least_recently_used(setup):
    reg, _ = setup
    probe = AdapterServer(reg, "base", max_adapters=8)
    size = {}
    for ref in ("a", "b", "c"):
        before = probe.memory()
        probe.load(ref)
        size[ref] = probe.memory() - before
    assert all(v > 0 for v in size.values())
    limit = size["b"] + max(size["a"], size["c"]) + 1
    server = AdapterServer(reg, "base", max_adapters=8, max_memory_mb=limit / 2**20)
    server.load("c")
    server.load("a")  # a is the most recently used
    expected_c = server.generate(["Hello there"], ["c"], max_new_tokens=4)
    server.load("a")
    server.load("b")  # a + c + b does not fit: c, the least recently used, goes
    assert server.resident() == ["a@1", "b@1"] and server.memory() <= limit
    assert (
        server.generate(["Hello there"], ["c"], max_new_tokens=4) == expected_c
    )  # reloaded on demand
    assert server.memory() <= limit and "c@1" in server.resident()
    small = AdapterServer(reg, "base", max_adapters=8, max_memory_mb=size["a"] / 2 / 2**20)
    with pytest.raises(InvalidInputError, match="more than max_memory_mb"):
        small.load("a")


def test_a_batch_whose_adapters_exceed_the_memory_bound_is_refused(setup):
    reg, _ = setup
    probe = AdapterServer(reg, "base", max_adapters=8)
    size = {}
    for ref in ("a", "c"):
        before = probe.memory()
        probe.load(ref)
        size[ref] = probe.memory() - before
    limit = max(size.values()) + 1  # each fits alone, not both together
    server = AdapterServer(reg, "base", max_adapters=8, max_memory_mb=limit / 2**20)
    alone = server.generate(["x"], ["c"], max_new_tokens=2)
    with (
        pytest.raises(InvalidInputError, match="do not fit max_adapters=8, max_memory_mb"),
        server.batch(["a", "c"], 2),
    ):
        pass
    # the scheduler runs them one at a time instead
    want = server.generate(["x"], ["a"], max_new_tokens=2) + alone
    assert server.generate(["x", "x"], ["a", "c"], max_new_tokens=2) == want
    assert server.generate(["x"], ["c"], max_new_tokens=2) == alone  # still serving


def _saved_unconverted(base, path, init: str):
    """A PEFT adapter initialised with ``init``, nudged as by training, saved as is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_are_refused_by_the_server_eval_and_vllm_check(
    tmp_path, tiny_llama, cli, monkeypatch, init
):
    from adaptr.evaluation.run import evaluate
    from adaptr.serving import AdapterServer
    from adaptr.serving.vllm.compat import check_servable

    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTR_HOME", str(home))
    reg = Registry(home)
    reg.add_base("tiny", tiny_llama)
    v = reg.add("p", _saved_unconverted(tiny_llama, tmp_path / "p", init), base="tiny")
    server = AdapterServer(reg, "tiny")
    with pytest.raises(InvalidInputError, match=f"initialised with {init}"):
        server.generate(["hi"], adapters=["p"], max_new_tokens=2)
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(InvalidInputError, match="path_initial_model_for_weight_conversion"):
        evaluate(["p"], data, "prompt-completion", "loss", registry=reg)
    assert reg.evals("p@1") == []
    with pytest.raises(InvalidAdapterError, match=f"initialised with {init}"):
        check_servable(reg, v)
    code, out, err = cli("check", "p", "--engine", "vllm")
    assert code != 0 and f"initialised with {init}" in err, err


def test_generate_loads_a_pissa_adapter_as_peft_does(tmp_path, tiny_llama):
    """The PEFT path (generate, merge) is the one that serves it: equal logits to PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptr import inference

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    src = _saved_unconverted(tiny_llama, tmp_path / "p", "pissa")
    reg.add("p", src, base="tiny")
    model, _tok, _refs = inference.load(reg, ["p"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), src)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        diff = (model(ids).logits - peft(ids).logits).abs().max().item()
    assert diff < 1e-5, diff  # float32, the same weights: equal up to summation order
