"""inference: each version renders chat with the template it was trained with, in generate,
AdapterServer and the HTTP server alike (inference.folder_chat_template)."""

from __future__ import annotations

import pytest
import torch

from adaptr.serving import AdapterServer
from adaptr.tiny import save_tiny_base

from helpers import random_lora

# what `sft.chat_template_path` trains with: unlike the tiny base's ChatML-like template
TRAINED = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|endoftext|>"
    "{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}### ASSISTANT: "
    "{% endif %}"
)


CHATS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("hi", "hello"), ("2+2", "4"), ("up", "down"), ("cat", "dog")]
]


CONV = [{"role": "user", "content": "Say hello"}]


def _strip_template(base):
    """``base``'s tokenizer saved without any chat template (as many base models ship)."""
    import json

    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = base / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    return base


def _gpt2_base(path):
    """A tiny GPT-2 (no family claims it) whose tokenizer has no chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from adaptr.tiny import make_tokenizer

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=260)).save_pretrained(
        path
    )
    tok = make_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(path)
    return _strip_template(path)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """Three bases and their adapters. "tiny" has the tiny tokenizer's template; "trained"
    was trained on it with sft.chat_template_path (TRAINED), "plain" stores none. "bare"
    has no template (the LLaMA family gives one): "onbare" was trained on it (training
    used the family's), "addbare" stores none. "gpt2": no template, no family; "ongpt2"."""
    import json
    import shutil

    from adaptr.cli import main
    from adaptr.registry import Registry

    root = tmp_path_factory.mktemp("templates")
    home = root / "home"
    tiny = save_tiny_base(root / "tiny", "llama", initializer_range=0.2)
    bare = _strip_template(save_tiny_base(root / "bare", "llama", seed=1, initializer_range=0.2))
    gpt2 = _gpt2_base(root / "gpt2")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "t.jinja").write_text(TRAINED)
    reg = Registry(home)
    for name, path in (("tiny", tiny), ("bare", bare), ("gpt2", gpt2)):
        reg.add_base(name, path)
    fast = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-1", "--no-gradient-checkpointing"]
    for name, base, extra in (
        ("trained", "tiny", ["--set", f"sft.chat_template_path={root / 't.jinja'}"]),
        ("onbare", "bare", []),
    ):
        args = ["--home", str(home), "train", "--base", base, "--data", str(root / "chats.jsonl")]
        args += ["--format", "messages", "--name", name, *fast, *extra]
        assert main(args) == 0
    reg.add(
        "plain", random_lora(tiny, root / "plain", 7, r=4, target_modules=["q_proj"]), base="tiny"
    )
    reg.add(
        "addbare",
        random_lora(bare, root / "addbare", 8, r=4, target_modules=["q_proj"]),
        base="bare",
    )
    gpt = random_lora(gpt2, root / "ongpt2", 9, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    reg.add("ongpt2", gpt, base="gpt2")
    shutil.rmtree(root / "plain")
    return reg


def _family(name):
    from adaptr.extend.catalog import get_family

    return get_family(name).chat_template


def _answer(reg, ref, base, template, conv, n):
    """What ``ref`` (None: the bare base) answers to ``conv`` rendered with ``template``,
    greedy: plain PEFT on a fresh base, the prompt tokenized as the server does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reg.base_path(base)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if ref is not None:
        model = PeftModel.from_pretrained(model, reg.export(ref, path + f"-x-{ref}", force=True))
    text = tok.apply_chat_template(
        conv, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            do_sample=False, pad_token_id=tok.eos_token_id,
        )  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids.shape[1]


def test_a_trained_version_stores_the_template_it_trained_with(templated):
    from adaptr.inference import stored_chat_template

    reg = templated
    assert "chat_template.jinja" in {f.path for f in reg.get("trained").files}
    assert stored_chat_template(reg, reg.get("trained")) == TRAINED
    # on a base without one, training used the LLaMA family's, and stored it
    assert stored_chat_template(reg, reg.get("onbare")) == _family("llama")
    assert stored_chat_template(reg, reg.get("plain")) is None


def test_serve_chat_renders_each_row_with_its_own_template(templated):
    """One mixed batch through AdapterServer.chat: the trained adapter with TRAINED, the
    one without a stored template and the bare base with the base's own."""
    from adaptr.tiny import CHAT_TEMPLATE

    reg = templated
    server = AdapterServer(reg, "tiny")
    refs = ["trained", "plain", None, "trained"]
    got = server.chat([CONV] * 4, refs, max_new_tokens=6)
    templates = {"trained": TRAINED, "plain": CHAT_TEMPLATE, None: CHAT_TEMPLATE}
    for ref, text in zip(refs, got, strict=True):
        assert text == _answer(reg, ref, "tiny", templates[ref], CONV, 6)[0], ref


def _mixed_chats(app, models):
    """The replies to CONV by each of ``models``, queued together (one mixed batch)."""
    from concurrent.futures import ThreadPoolExecutor

    from helpers import START_S, client, running, wait_for

    with running(app) as url:
        api = client(url)
        batcher = app.state.context.scheduler
        start = batcher.submitted
        batcher.hold()
        with ThreadPoolExecutor(len(models)) as pool:
            try:
                futures = [
                    pool.submit(api.chat.completions.create, model=m, messages=CONV, max_tokens=5)
                    for m in models
                ]
                wait_for(lambda: batcher.submitted >= start + len(models), "requests queued")
            finally:
                batcher.release()
            return [f.result(timeout=START_S) for f in futures]


def test_the_http_server_answers_chats_with_each_versions_template(templated):
    import openai

    from adaptr.serving.openai.app import create_app
    from adaptr.tiny import CHAT_TEMPLATE

    from helpers import client, running

    reg = templated
    cases = {  # base -> (model, the template it must render with)
        "tiny": [("trained", TRAINED), ("plain", CHAT_TEMPLATE), ("tiny", CHAT_TEMPLATE),
                 ("trained@1", TRAINED)],
        "bare": [("onbare", _family("llama")), ("addbare", _family("llama")), ("bare", _family("llama"))],
    }  # fmt: skip
    for base, models in cases.items():
        replies = _mixed_chats(create_app(AdapterServer(reg, base)), [m for m, _ in models])
        for (model, template), reply in zip(models, replies, strict=True):
            ref = None if model == base else model
            text, prompt_tokens = _answer(reg, ref, base, template, CONV, 5)
            assert reply.usage.prompt_tokens == prompt_tokens, model
            assert reply.choices[0].message.content == text, model
    app = create_app(AdapterServer(reg, "gpt2"))
    with running(app) as url:
        api = client(url)
        for model, what in (("ongpt2", "ongpt2@1"), ("gpt2", "the base gpt2")):
            with pytest.raises(openai.BadRequestError) as e:
                api.chat.completions.create(model=model, messages=CONV, max_tokens=2)
            message = e.value.body["message"]
            assert e.value.status_code == 400 and message.startswith(f"{what} has no chat template")
            assert "chat_template.jinja" in message and "\n" not in message
        # completions need no template
        assert (
            api.completions.create(model="ongpt2", prompt="hi", max_tokens=2).choices[0].text
            is not None
        )


def test_generate_chat_uses_the_versions_template(cli, templated):
    import json

    from adaptr.tiny import CHAT_TEMPLATE

    from helpers import refused

    reg = templated
    home = str(reg.home)
    conv = [{"role": "user", "content": "Say hello"}]
    for ref, base, template in (
        ("trained", "tiny", TRAINED), ("plain", "tiny", CHAT_TEMPLATE),
        ("onbare", "bare", _family("llama")), ("addbare", "bare", _family("llama")),
    ):  # fmt: skip
        code, out, err = cli("--home", home, "generate", ref, conv[0]["content"], "--chat",
                             "--max-new-tokens", "5", "--json")  # fmt: skip
        assert code == 0, (ref, err)
        assert json.loads(out)["completion"] == _answer(reg, ref, base, template, conv, 5)[0], ref
    line = refused(cli, reg.home, None, "--home", home, "generate", "ongpt2", "hi", "--chat",
                   match="the model has no chat template")  # fmt: skip
    assert "generate without --chat" in line
    code, out, err = cli("--home", home, "generate", "ongpt2", "hi", "--max-new-tokens", "2")
    assert code == 0, err
