"""The continuous-batching scheduler: requests that join and leave a running batch at any
step get exactly what they get alone (PEFT, one prompt at a time).

Joining is made deterministic with ``Scheduler.on_step`` (called on the worker thread after
each decoding step): a request submitted there joins at the very next step. No timings.
"""

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.serving import AdapterServer
from adaptr.serving.requests import Request, Sampling
from adaptr.serving.scheduler import Scheduler
from adaptr.serving.text import Detokenizer
from adaptr.tiny import save_tiny_base

from helpers import random_lora, wait_for

PROMPTS = ["Hello there", "你好", "Quote: Knowledge is power", "x", "Translate: cat", "abc"]
LOGITS_TOL = 1e-4  # fp32: the batch's padding and shapes change the sums' order, not more
WAIT_S = 120  # generous: the machine may be busy


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "qwen2"])
def setup(request, tmp_path_factory):
    from adaptr.registry import Registry

    root = tmp_path_factory.mktemp(f"sched-{request.param}")
    base = save_tiny_base(root / "base", request.param, initializer_range=0.2)
    lin = ["query_key_value"] if request.param == "gpt_neox" else ["q_proj", "v_proj"]
    reg = Registry(root / "home")
    reg.add_base("base", base)
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=lin),
        "b": dict(r=8, lora_alpha=32, target_modules=lin, use_rslora=True),
        "dora": dict(r=2, target_modules=lin, use_dora=True),  # PEFT runs it apart
        "big": dict(r=8, lora_alpha=16, target_modules=lin),  # above max_rank=4: PEFT, mixed
    }
    for i, (name, spec) in enumerate(specs.items()):
        reg.add(name, random_lora(base, root / name, 200 + i, **spec), base="base")
    server = AdapterServer(reg, "base", max_adapters=4, max_rank=4)
    scheduler = Scheduler(server)
    yield reg, base, server, scheduler
    assert scheduler.close(WAIT_S)


_ALONE: dict = {}


def alone(reg, base, ref, ids, n):
    """(greedy tokens, each step's logits) of ``ref`` (None: the base) on ``ids``, PEFT alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(base), ref)
    if key not in _ALONE:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        if ref is not None:
            out = reg.home.parent / f"export-{ref}"
            model = PeftModel.from_pretrained(model, reg.export(ref, out, force=True)).eval()
        _ALONE[key] = model
    model = _ALONE[key]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    tokens = out.sequences[0, x.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokens, [step[0].float() for step in out.logits]


def run(scheduler, plan):
    """Submit ``plan``'s requests: ``(step, request)``, step 0 at once, step k right after the
    k-th decoding step from now (so it joins at the next one); waits for all of them. Those
    whose step never comes (the batch ended first) are submitted when it has ended."""
    import threading
    import time

    start = scheduler.steps
    later = sorted((s, i) for i, (s, _) in enumerate(plan) if s > 0)
    lock = threading.Lock()

    def submit_upto(step):
        with lock:
            while later and later[0][0] <= step:
                scheduler.submit(plan[later.pop(0)[1]][1])

    scheduler.on_step = lambda step: submit_upto(step - start)
    try:
        for s, req in plan:
            if s == 0:
                scheduler.submit(req)
        deadline = time.monotonic() + WAIT_S
        for _, req in plan:
            while not req.done.wait(0.05):
                if not scheduler.batch.rows and not scheduler.waiting:
                    submit_upto(float("inf"))
                if time.monotonic() > deadline:
                    pytest.fail(f"a request did not finish within {WAIT_S} s")
            req.wait(0)
    finally:
        scheduler.on_step = None
    return [req for _, req in plan]


def ids(server, prompt):
    return server.tokenizer(prompt).input_ids


def test_requests_joining_mid_flight_get_their_alone_tokens_and_logits(setup):
    reg, base, server, scheduler = setup
    ends: list[str] = []

    def req(prompt, adapter, n, name):
        def on_event(event):
            if event[0] == "end":
                ends.append(name)

        return Request(ids(server, prompt), adapter, n, keep_logits=True, on_event=on_event)

    long = req(PROMPTS[2], "a@1", 30, "long")
    plan = [
        (0, long),
        (0, req(PROMPTS[0], None, 5, "base")),
        (2, req(PROMPTS[1], "b@1", 4, "short")),  # joins during the long one
        (3, req(PROMPTS[3], "big@1", 7, "big")),  # PEFT's fallback, in the same batch
        (3, req(PROMPTS[4], "a@1", 6, "a2")),
        (9, req(PROMPTS[5], "b@1", 3, "late")),
    ]
    done = run(scheduler, plan)
    assert ends[-1] == "long" and ends.index("short") < ends.index("long")
    assert long.finish == "length"
    wait_for(lambda: not scheduler.batch.rows, "the finished rows to leave", WAIT_S)
    for r in done:
        tokens, logits = alone(reg, base, r.adapter, r.prompt_ids, r.max_tokens)
        assert r.tokens == tokens, r.adapter
        assert r.text == server.tokenizer.decode(tokens, skip_special_tokens=True)
        assert len(r.logits) >= len(tokens)
        for got, want in zip(r.logits, logits, strict=False):
            assert (got - want).abs().max() < LOGITS_TOL, r.adapter


def test_logprobs_of_rows_joining_mid_flight_equal_peft(setup, monkeypatch):
    """Each generated token's log-probability (EOS included) and its top 3, and with
    ``prompt_logprobs`` the prompt's (scored 3 positions at a time here), for rows joining a
    running batch: PEFT's log-softmax within 1e-4."""
    import adaptr.serving.scheduler as module

    monkeypatch.setattr(module, "PROMPT_CHUNK", 3)
    reg, base, server, scheduler = setup

    def req(prompt, adapter, n, **kw):
        return Request(ids(server, prompt), adapter, n, logprobs=3, **kw)

    plan = [
        (0, req(PROMPTS[2], "a@1", 12)),
        (2, req(PROMPTS[0], "b@1", 5, prompt_logprobs=True)),
        (4, req(PROMPTS[4], None, 4, prompt_logprobs=True)),
        (5, req(PROMPTS[1], "big@1", 0, prompt_logprobs=True)),  # the prompt only
    ]
    for r in run(scheduler, plan):
        tokens, logits = alone(reg, base, r.adapter, r.prompt_ids, max(r.max_tokens, 1))
        tokens, logits = tokens[: r.max_tokens], logits[: r.max_tokens]
        got = r.token_logprobs
        assert [e.token for e in got][: len(tokens)] == tokens and len(got) <= len(tokens) + 1
        for entry, step in zip(got, logits, strict=False):
            want = torch.log_softmax(step, -1)
            assert abs(entry.logprob - float(want[entry.token])) < 1e-4, r.adapter
            top_values, top_ids = want.topk(3)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry.top, top_values.tolist(), strict=True)) < 1e-4  # fmt: skip
        if r.prompt_logprobs:
            model = _ALONE[(str(base), r.adapter)]
            with torch.no_grad():
                full = model(input_ids=torch.tensor([r.prompt_ids])).logits[0].float()
            want = torch.log_softmax(full, -1)
            assert r.prompt_token_logprobs[0] is None
            assert len(r.prompt_token_logprobs) == len(r.prompt_ids)
            for j, entry in enumerate(r.prompt_token_logprobs[1:], 1):
                assert entry.token == r.prompt_ids[j]
                assert abs(entry.logprob - float(want[j - 1, entry.token])) < 1e-4
        if r.max_tokens == 0:
            assert r.tokens == [] and got == [] and r.finish == "length"


def test_a_failed_prefill_fails_its_requests_and_scored_prefills_keep_to_their_budget(
    setup, monkeypatch
):
    import adaptr.serving.scheduler as module

    reg, base, server, scheduler = setup
    real = module._prompt_logprobs

    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(module, "_prompt_logprobs", broken)
    r = scheduler.submit(Request(ids(server, PROMPTS[0]), "a@1", 4, prompt_logprobs=True))
    with pytest.raises(RuntimeError, match="simulated"):
        r.wait(WAIT_S)  # failed, not lost
    monkeypatch.setattr(module, "_prompt_logprobs", real)
    # a budget of one prompt position: scoring prefills take one request each
    widths: list[int] = []
    forward = scheduler._forward

    def recording(rows, **kw):
        if kw.get("every_position"):
            widths.append(len(rows))
        return forward(rows, **kw)

    monkeypatch.setattr(scheduler, "_forward", recording)
    monkeypatch.setattr(scheduler, "score_budget", 1)
    scheduler.hold()
    requests = [
        scheduler.submit(Request(ids(server, p), "b@1", 2, prompt_logprobs=True, logprobs=0))
        for p in PROMPTS[:3]
    ]
    scheduler.release()
    for r in requests:
        assert len(r.wait(WAIT_S).prompt_token_logprobs) == len(r.prompt_ids)
    assert widths == [1, 1, 1]


def test_eval_generations_decode_at_most_batch_size_x_refs_rows(setup):
    from adaptr.evaluation.run import _generations

    reg, base, server, scheduler = setup
    fresh = AdapterServer(reg, "base", max_adapters=4, max_rank=4)
    out = _generations(fresh, PROMPTS[:4], ["a@1", None], 1, 3, None)
    assert fresh.scheduler.most_rows == 2 and fresh.scheduler.max_batch == 32
    want = server.generate(PROMPTS[:4], ["a@1"] * 4, max_new_tokens=3)
    assert out["a@1"] == want
    assert fresh.scheduler.close(WAIT_S)


def test_min_tokens_and_ignore_eos(setup):
    """min_tokens: no end token is chosen before it (the runner-up is, its log-probability
    still the model's own); ignore_eos: max_tokens whatever comes."""
    reg, base, server, scheduler = setup
    prompt = ids(server, PROMPTS[0])
    tokens, logits = alone(reg, base, "a@1", prompt, 4)
    end = frozenset({tokens[0]})  # the first greedy token made an end token
    r = scheduler.submit(Request(prompt, "a@1", 6, eos_tokens=end)).wait(WAIT_S)
    assert r.tokens == [] and r.finish == "stop"
    r = scheduler.submit(Request(prompt, "a@1", 6, eos_tokens=end, min_tokens=2, logprobs=0)).wait(
        WAIT_S
    )
    runner_up = int(logits[0].topk(2).indices[1])
    assert r.tokens[0] == runner_up and tokens[0] not in r.tokens[:2]
    want = float(torch.log_softmax(logits[0], -1)[runner_up])
    assert abs(r.token_logprobs[0].logprob - want) < 1e-4
    r = scheduler.submit(Request(prompt, "a@1", 5, eos_tokens=end, ignore_eos=True)).wait(WAIT_S)
    assert len(r.tokens) == 5 and r.tokens[0] == tokens[0] and r.finish == "length"


def test_an_adapter_peft_runs_apart_waits_for_the_batch_to_drain(setup):
    reg, base, server, scheduler = setup
    first = Request(ids(server, PROMPTS[0]), "a@1", 6)
    dora = Request(ids(server, PROMPTS[1]), "dora@1", 5)
    after = Request(ids(server, PROMPTS[3]), None, 4)  # behind it in line
    done = run(scheduler, [(0, first), (1, dora), (2, after)])
    for r in done:
        assert r.tokens == alone(reg, base, r.adapter, r.prompt_ids, r.max_tokens)[0], r.adapter


def test_cancel_frees_the_row_and_the_others_go_on(setup):
    reg, base, server, scheduler = setup
    long = Request(ids(server, PROMPTS[2]), "b@1", 40)
    other = Request(ids(server, PROMPTS[4]), "a@1", 8)
    queued = Request(ids(server, PROMPTS[0]), None, 8)
    queued.cancel()  # cancelled before it starts: dropped
    dropped = scheduler.dropped
    scheduler.on_step = lambda step: long.cancel() if len(long.tokens) >= 3 else None
    try:
        scheduler.submit(long)
        scheduler.submit(other)
        scheduler.submit(queued)
        for r in (long, other, queued):
            r.wait(WAIT_S)
    finally:
        scheduler.on_step = None
    assert long.finish == "cancelled" and 3 <= len(long.tokens) < 6
    assert queued.finish == "cancelled" and queued.tokens == []
    assert scheduler.dropped == dropped + 1
    assert other.tokens == alone(reg, base, "a@1", other.prompt_ids, 8)[0]
    wait_for(lambda: not scheduler.batch.rows, "the finished rows to leave", WAIT_S)


def test_stop_strings_end_the_row(setup):
    reg, base, server, scheduler = setup
    prompt = ids(server, PROMPTS[2])
    tokens, _ = alone(reg, base, "a@1", prompt, 12)
    whole = server.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = whole[4:6]
    pieces: list[str] = []
    r = Request(prompt, "a@1", 12, stop=(stop,), on_event=lambda e: pieces.append(e))
    scheduler.submit(r).wait(WAIT_S)
    cut = whole.find(stop)
    assert r.finish == "stop" and r.text == whole[:cut]
    assert "".join(v for k, v in pieces if k == "text") == r.text
    assert pieces[-1] == ("end", "stop")


def test_seeded_sampling_is_reproducible_alone_or_batched(setup):
    _, _, server, scheduler = setup
    hot = Sampling(temperature=1.5, top_p=0.9, seed=7)

    def sampled():
        return Request(ids(server, PROMPTS[0]), "a@1", 10, sampling=hot)

    solo = run(scheduler, [(0, sampled())])[0]
    batched = run(
        scheduler,
        [(0, Request(ids(server, PROMPTS[2]), "b@1", 12)),
         (2, sampled()), (2, Request(ids(server, PROMPTS[1]), None, 6))],
    )[1]  # fmt: skip
    assert solo.tokens == batched.tokens and len(solo.tokens) > 0
    other = run(scheduler, [(0, Request(ids(server, PROMPTS[0]), "a@1", 10, sampling=Sampling(1.5, 0.9, 8)))])  # fmt: skip
    assert other[0].tokens != solo.tokens  # (10 tokens of a random model at temperature 1.5)


def test_an_unknown_adapter_fails_its_request_only(setup):
    _, _, server, scheduler = setup
    good = Request(ids(server, PROMPTS[0]), "a@1", 4)
    bad = Request(ids(server, PROMPTS[1]), "nope", 4)
    scheduler.submit(good)
    scheduler.submit(bad)
    assert good.wait(WAIT_S).finish in ("length", "stop")
    with pytest.raises(Exception, match="nope"):
        bad.wait(WAIT_S)


def test_detokenizer_gives_the_whole_decode_piece_by_piece(setup):
    _, _, server, _ = setup
    tok = server.tokenizer
    text = "Hello 你好 wörld — ok\n  indented ✓ end"
    ids_ = tok(text, add_special_tokens=False).input_ids
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids_] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids_, skip_special_tokens=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, len(tok), (60,), generator=g).tolist()
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in noise] + [d.flush()]
    assert "".join(pieces) == tok.decode(noise, skip_special_tokens=True)


def test_adapter_server_generate_and_stream_go_through_its_scheduler(setup):
    reg, base, server, _ = setup
    own = server.scheduler
    before = own.submitted
    texts = server.generate(PROMPTS[:3], ["a@1", None, "dora@1"], max_new_tokens=5)
    assert own.submitted == before + 3
    for prompt, ref, text in zip(PROMPTS[:3], ["a@1", None, "dora@1"], texts, strict=True):
        tokens, _ = alone(reg, base, ref, ids(server, prompt), 5)
        assert text == server.tokenizer.decode(tokens, skip_special_tokens=True), ref
    assert "".join(server.stream(PROMPTS[0], "a@1", max_new_tokens=5)) == texts[0]
    pieces = server.stream(PROMPTS[2], "b@1", max_new_tokens=200)
    next(p for p in pieces if p)
    pieces.close()  # the caller stops reading: the row leaves
    wait_for(lambda: not own.batch.rows and not own.waiting, "the stream's row to leave", WAIT_S)
    seeded = {"do_sample": True, "temperature": 1.2, "seed": 3, "max_new_tokens": 8}
    assert server.generate([PROMPTS[1]], ["b@1"], **seeded) == server.generate(
        [PROMPTS[1]], ["b@1"], **seeded
    )
    # submit: a Request at once; eos_token_id replaces the model's EOS (the scheduler takes it)
    tokens, _ = alone(reg, base, "a@1", ids(server, PROMPTS[0]), 5)
    r = server.submit(PROMPTS[0], "a@1", max_new_tokens=5, eos_token_id=[tokens[2]])
    assert r.wait(WAIT_S).tokens == tokens[:2] and r.finish == "stop"
    before = own.submitted
    assert server.generate([PROMPTS[0]], ["a@1"], max_new_tokens=5, eos_token_id=tokens[1]) == [
        server.tokenizer.decode(tokens[:1], skip_special_tokens=True)
    ]
    assert own.submitted == before + 1
    with pytest.raises(InvalidInputError, match="num_beams: not taken by the scheduler"):
        server.submit(PROMPTS[0], "a@1", num_beams=2)
