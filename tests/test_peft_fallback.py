"""AdapterServer with adapters PEFT (0.21) cannot put in one mixed batch (issue 14).

Saved embeddings / heads (``modules_to_save``), trainable tokens, LoRA on the embedding,
DoRA, next to stacked LoRA and the bare base: every mix either runs as one batch, or is
split into batches PEFT can run (``partition``), or is refused with a one-line AdaptrError;
never PEFT's raw TypeError/ValueError. Every answer is checked against the adapter served
alone by plain PEFT (``PeftModel.from_pretrained`` on a fresh base).
"""

from itertools import permutations

import pytest
import torch

from adaptr.errors import AdaptrError, InvalidInputError
from adaptr.serving import AdapterServer

PROMPTS = ["Hello there", "hi", "Quote: Knowledge is power", "xyz", "Translate: cat", "the end"]
NEW = 5  # greedy tokens per answer
# fp32 logits of magnitude ~5: the server and plain PEFT sum the same terms in another order
# (stacks in place, PEFT's sub-batches), a few ulps apart (~1e-6 seen); 1e-4 bounds that
# loosely and is far below what an adapter changes (> 1e-2, test_every_adapter_changes_the_answer)
TOL = 1e-4
LIN = ["q_proj", "v_proj"]


def _specs(tok):
    ids = tok.convert_tokens_to_ids
    return {
        "pl": dict(r=4, lora_alpha=8, target_modules=LIN),  # stacked, not PEFT's
        "emb1": dict(r=2, target_modules=LIN, modules_to_save=["embed_tokens"]),
        "emb2": dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        "head1": dict(r=2, target_modules=LIN, modules_to_save=["lm_head"]),
        "head2": dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]),
        "tok1": dict(r=2, target_modules=LIN, trainable_token_indices=ids(list("elo"))),
        "tok2": dict(r=2, target_modules=["q_proj"], trainable_token_indices=ids(list("hit"))),
        "lemb": dict(r=4, target_modules=["embed_tokens", "q_proj"]),  # LoRA on the embedding
        "dora": dict(r=2, target_modules=LIN, use_dora=True),
        "norm": dict(r=2, target_modules=LIN, modules_to_save=["norm"]),  # not mixable
        "alora": dict(r=2, target_modules=LIN, alora_invocation_tokens=ids(list("hi"))),
    }


def _adapter(base, path, seed: int, **spec):
    """A PEFT LoRA on ``base`` whose every trained tensor (LoRA, saved copies, token rows)
    is random, so each changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **spec)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(3.0)
            elif "modules_to_save" in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(path)
    return path


class Setup:
    """A tiny LLaMA (base "tiny") with every adapter of :func:`_specs`, and what each gives
    served alone by plain PEFT."""

    def __init__(self, root, tied: bool):
        from adaptr.registry import Registry
        from adaptr.tiny import make_tokenizer, save_tiny_base

        self.root = root
        self.base = save_tiny_base(
            root / "base", "llama", initializer_range=0.2, tie_word_embeddings=tied
        )
        self.reg = Registry(root / "home")
        self.reg.add_base("tiny", self.base)
        self.tok = make_tokenizer()
        for i, (name, spec) in enumerate(_specs(self.tok).items()):
            self.reg.add(name, _adapter(self.base, root / name, 40 + i, **spec), base="tiny")
        self._alone: dict = {}

    def server(self, **kw) -> AdapterServer:
        return AdapterServer(self.reg, "tiny", **{"max_adapters": 8, **kw})

    def alone(self, ref, prompt):
        """(last-token logits, greedy text) of ``ref`` (None: the base) alone, plain PEFT."""
        if (ref, prompt) not in self._alone:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.base).eval()
            if ref is not None:
                folder = self.reg.export(ref, self.root / f"exp-{ref}", force=True)
                model = PeftModel.from_pretrained(model, folder).eval()
            ids = self.tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                    do_sample=False, pad_token_id=self.tok.eos_token_id,
                )  # fmt: skip
            text = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            self._alone[ref, prompt] = (logits, text)
        return self._alone[ref, prompt]

    def check(self, server: AdapterServer, adapters, parts=None) -> None:
        """``server`` answers ``adapters`` (one per prompt) as each alone, in the batches
        ``parts`` (when given)."""
        prompts = (PROMPTS * 2)[: len(adapters)]
        if parts is not None:
            assert server.partition(adapters, len(adapters)) == parts
        logits, _ = server.logits(prompts, adapters)
        texts = server.generate(prompts, adapters, max_new_tokens=NEW)
        for i, (prompt, ref) in enumerate(zip(prompts, adapters, strict=True)):
            want_logits, want_text = self.alone(ref, prompt)
            err = float((logits[i, -1] - want_logits).abs().max())
            assert err < TOL, (ref, prompt, err)
            assert texts[i] == want_text, (ref, prompt)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("mixing"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The same with tied input and output embeddings (trainable tokens then wrap lm_head too)."""
    return Setup(tmp_path_factory.mktemp("mixing-tied"), tied=True)


def test_every_adapter_changes_the_answer(setup):
    for name in _specs(setup.tok):
        if name != "alora":  # served only by PEFT's own generate (refused below)
            diff = (setup.alone(name, PROMPTS[0])[0] - setup.alone(None, PROMPTS[0])[0]).abs()
            assert float(diff.max()) > 1e-2, name


def test_saved_embeddings_and_heads_of_several_adapters_mix_in_one_batch(setup):
    server = setup.server()
    adapters = ["emb1", "emb2", None, "pl", "head1", "head2", "emb1"]
    setup.check(server, adapters, parts=[list(range(7))])
    assert sorted(server.served_by_peft()) == ["emb1@1", "emb2@1", "head1@1", "head2@1"]


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_trainable_tokens_mix_with_each_other_saved_modules_and_the_base(setup, tied, which):
    s = setup if which == "untied" else tied
    adapters = ["tok1", "tok2", None, "pl", "head1", "tok1"]
    # with tied embeddings the tokens change lm_head as well, which head1 saves whole
    parts = [list(range(6))] if which == "untied" else [[0, 1, 2, 3, 5], [4]]
    s.check(s.server(), adapters, parts=parts)


def test_adapters_changing_one_module_two_ways_run_in_separate_batches(setup):
    """A saved embedding, trainable tokens and LoRA on the embedding: PEFT cannot wrap one
    in the other (a TypeError on load, or every forward failing), so each runs in a batch of
    its own and loading one evicts the others."""
    server = setup.server()
    adapters = ["emb1", "tok1", "lemb", None, "pl", "emb2", "tok1"]
    setup.check(server, adapters, parts=[[0, 3, 4, 5], [1, 6], [2]])
    # the last batch (lemb) evicted what changes the embedding otherwise
    assert sorted(server.resident()) == ["lemb@1", "pl@1"]
    embed = server.model.get_input_embeddings()
    assert type(embed).__name__ == "Embedding" and hasattr(embed, "lora_embedding_A")
    assert embed.base_layer is server.fallback.modules["model.embed_tokens"]
    # every order of loading them (and back again)
    for first, second in permutations(["emb1", "tok1", "lemb"], 2):
        server.load(first)
        setup.check(server, [second, None, second])
    assert server.served_by_peft() == ["tok1@1"]


def test_loading_after_trainable_tokens_and_after_the_active_or_last_adapter_left(setup):
    # PEFT alone fails here: a KeyError for the trainable tokens' weights
    server = setup.server()
    server.load("tok1")
    server.load("head1")
    setup.check(server, ["tok1", "head1", None, "head1"])
    # the active adapter evicted while the first LoRA layer (q_proj) held only it: PEFT is
    # left with none active (ValueError 'Please specify at least one adapter to set' next)
    server = setup.server()
    server.load("head2")  # v_proj and a saved lm_head
    server.generate(["hi"], ["emb2"], max_new_tokens=1)  # q_proj only; active for its batch
    server.slots.evict("emb2@1")
    assert server.fallback.peft.base_model.active_adapters == []
    setup.check(server, ["emb1", "head2", None])
    # the last PEFT adapter evicted: its wrapper goes, and a saved module loads again
    # (PEFT alone: ValueError 'Please specify at least one adapter to set')
    one = setup.server(max_adapters=1)
    one.load("emb1")
    one.load("pl")
    assert one.served_by_peft() == [] and one.fallback.peft is None
    assert isinstance(one.model.get_input_embeddings(), torch.nn.Embedding)
    setup.check(one, ["head1", "head1"])
    setup.check(one, ["emb1"])


def test_dora_and_a_saved_norm_run_apart_from_everything_else(setup):
    server = setup.server()
    adapters = ["dora", "emb1", None, "pl", "norm", "head2", "dora"]
    setup.check(server, adapters, parts=[[0, 6], [1, 2, 3, 5], [4]])


def _one_line(e: pytest.ExceptionInfo, match: str) -> None:
    assert isinstance(e.value, AdaptrError) and match in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_what_peft_cannot_run_is_a_one_line_adaptr_error(setup):
    server = setup.server()
    with pytest.raises(InvalidInputError) as e, server.batch(["emb1", "tok1"], 2):
        pass
    _one_line(e, "both change model.embed_tokens")
    with pytest.raises(InvalidInputError) as e, server.batch(["dora", None], 2):
        pass
    _one_line(e, "dora@1: DoRA")
    with pytest.raises(InvalidInputError) as e, server.batch(["norm", "emb1"], 2):
        pass
    _one_line(e, "norm@1: a saved copy (modules_to_save) of model.layers.0.input_layernorm")
    assert "(LlamaRMSNorm) and 4 more" in str(e.value)  # PEFT saves every module named *norm
    with pytest.raises(InvalidInputError) as e:  # row-aware arguments cannot follow a split
        server.generate(["a", "b"], ["emb1", "lemb"], streamer=object())
    _one_line(e, "separate batches")
    # activated LoRA: only PeftModel.generate applies it
    assert server.partition(["alora", None], 2) == [[0, 1]]  # the batch reports it
    with pytest.raises(InvalidInputError) as e:
        server.generate(["hi there"], ["alora"])
    _one_line(e, "activated LoRA")
    # a mix that reached PEFT anyway is refused before PEFT raises its own errors
    server.load("dora")
    with pytest.raises(InvalidInputError) as e, server.fallback.rows(["dora@1", "__base__"]):
        server.model(**server.tokenizer(["hi", "yo"], return_tensors="pt"))
    _one_line(e, "PEFT cannot run dora@1 in one batch")
    # and the server still answers correctly
    setup.check(server, ["dora", "emb1", None], parts=[[0], [1, 2]])


def test_a_load_peft_fails_on_leaves_nothing_behind(setup, monkeypatch):
    """Whatever PEFT still raises while loading (here after it wrapped the modules) is a
    one-line AdaptrError, and the served model keeps nothing of that adapter."""
    import adaptr.inference

    server = setup.server()
    server.load("head1")
    real = adaptr.inference.attach

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise TypeError("modules_to_save cannot be applied to modules of type <lora.Embedding>")

    monkeypatch.setattr(adaptr.inference, "attach", failing)
    with pytest.raises(InvalidInputError) as e:
        server.load("emb1")
    _one_line(e, "PEFT could not load emb1@1 beside the adapters this server holds (TypeError")
    monkeypatch.undo()
    assert "emb1@1" not in server.fallback.peft.peft_config
    assert isinstance(server.model.get_input_embeddings(), torch.nn.Embedding)  # unwrapped
    assert server.resident() == ["head1@1"]
    setup.check(server, ["emb1", "head1", None])


def test_the_http_server_answers_every_mix_or_refuses_it_with_a_4xx(setup):
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from adaptr.serving.openai.app import create_app

    from helpers import START_S, client, expected, running, wait_for

    app = create_app(setup.server())
    models = ["emb1", "tok1", "tiny", "lemb", "emb2", "dora", "pl", "head1", "tok2", "emb1"]
    prompts = [f"mix {i}" for i in range(len(models))]
    with running(app) as url:
        api = client(url)
        batcher = app.state.context.scheduler

        def one(i):
            return api.completions.create(model=models[i], prompt=prompts[i], max_tokens=4)

        start = batcher.submitted
        batcher.hold()  # all queued first: they start as one batch that must be split
        with ThreadPoolExecutor(len(models)) as pool:
            try:
                futures = [pool.submit(one, i) for i in range(len(models))]
                wait_for(lambda: batcher.submitted >= start + len(models), "requests queued")
            finally:
                batcher.release()
            texts = [f.result(timeout=START_S).choices[0].text for f in futures]
        # queued as one batch of 10, run as the batches PEFT can run: the saved embeddings (3
        # rows), the trainable tokens (2), lemb, dora, and the base, pl and head1 (3 rows) with
        # the first of those that mixes to arrive: 4 to 6 rows at most
        assert 4 <= batcher.most_rows <= 6
        for model, prompt, text in zip(models, prompts, texts, strict=True):
            ref = None if model == "tiny" else model
            assert text == expected(setup.reg, ref, prompt, 4), model
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model="alora", prompt="hi there", max_tokens=2)
        assert e.value.status_code == 400 and "activated LoRA" in e.value.body["message"]
