"""adaptr ui: every page through Starlette's TestClient, the guards, hostile input, the stream.

The registry (:func:`build_registry`, shared with tests/test_ui_browser.py) holds real
trained versions (``zh@1``, ``zh@2`` trained ``--from`` it, with log histories and eval
loss), random LoRAs ``a`` and ``b`` (greedy answers that differ), a linear compose
``blend@1`` of them, stored evals, a removed version and hostile text in a model card,
lineage and an eval's dataset path.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from helpers import random_lora, write_adapter

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PROMPT = "Knowledge is"


def build_registry(root: Path, tiny_llama: Path):
    """The UI's test registry in ``root / "home"`` (see the module docstring); returns it."""
    from adaptr.compose import compose
    from adaptr.evaluation.run import evaluate
    from adaptr.registry import Registry
    from adaptr.training.trainer import train

    reg = Registry(root / "home")
    reg.add_base("tiny", tiny_llama)
    sft = {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
           "gradient_checkpointing": False, "logging_steps": 1, "eval_strategy": "steps",
           "eval_steps": 2, "report_to": []}  # fmt: skip
    recipe = {"name": "zh", "base": {"path": "tiny"}, "lora": {"r": 4},
              "data": {"path": str(ZH_EN), "format": "alpaca", "eval_split": 0.2}, "sft": sft}  # fmt: skip
    train(recipe, registry=reg, progress=False)
    train({**recipe, "from": "zh@1"}, registry=reg, progress=False)
    for name, seed in (("a", 1), ("b", 2)):
        reg.add(name, random_lora(tiny_llama, root / name, seed, **LORA), base="tiny")
    compose(reg, ["a@1", "b@1"], [0.7, 0.3], "linear", "blend")
    evaluate(["zh@1", "zh@2"], ZH_EN, "alpaca", "loss,ppl", registry=reg)
    card = {"README.md": f"# card\n{HOSTILE}\n"}
    reg.add("card", write_adapter(root / "card", extra_files=card), base="tiny",
            lineage={"parents": ["gone@1"], "note": HOSTILE}, metrics={"train_loss": 1.5})  # fmt: skip
    reg.add_evals([("card@1", {"metrics": {"loss": 2.0}, "settings": {"format": HOSTILE},
                               "dataset": {"path": f"/x/{HOSTILE}.jsonl", "sha256": "f" * 64}})])  # fmt: skip
    reg.add("gone", write_adapter(root / "gone", seed=3), base="tiny")
    reg.add("gone", write_adapter(root / "gone2", seed=4), base="tiny")
    reg.remove("gone@1")
    reg.tag("zh@1", "prod")
    return reg


@pytest.fixture(scope="module")
def reg(tmp_path_factory, tiny_llama):
    return build_registry(tmp_path_factory.mktemp("ui"), tiny_llama)


@pytest.fixture(scope="module")
def client(reg):
    from adaptr.ui import create_app

    with TestClient(create_app(reg)) as c:
        yield c


def csrf(client) -> str:
    page = client.get("/adapters").text
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def reason(page: str) -> str:
    return re.search(r'id="reason">(.*?)</p>', page, re.S).group(1)


# ------------------------------------------------------------------ pages
def test_adapters_list_newest_first_links_and_filters(client, reg):
    page = client.get("/adapters").text
    refs = re.findall(r'<tr data-ref="([^"]+)"', page)
    newest = sorted(reg.list(), key=lambda v: -v.created)
    assert refs == [v.ref for v in newest] and "gone@1" not in refs
    assert 'href="/v/zh@2"' in page and 'href="/v/blend@1"' in page
    assert re.findall(r'<tr data-ref="([^"]+)"', client.get("/adapters?q=zh").text) == ["zh@2", "zh@1"]  # fmt: skip
    assert re.findall(r'<tr data-ref="([^"]+)"', client.get("/adapters?tag=prod").text) == ["zh@1"]  # fmt: skip
    assert "no version matches" in client.get("/adapters?base=other").text
    fragment = client.get("/adapters?q=blend", headers={"HX-Request": "true"}).text
    assert "<html" not in fragment and 'data-ref="blend@1"' in fragment


def test_thousand_versions_are_paged(tmp_path):
    from adaptr.registry import Registry
    from adaptr.ui import create_app
    from adaptr.ui.views import PER_PAGE

    reg = Registry(tmp_path / "home")
    src = write_adapter(tmp_path / "a")
    for i in range(PER_PAGE + 5):
        reg.add(f"n{i % 3}", src, base="org/llama")
    c = TestClient(create_app(reg))
    first = c.get("/adapters").text
    assert len(re.findall(r"<tr data-ref=", first)) == PER_PAGE and 'rel="next"' in first
    second = c.get("/adapters?page=2").text
    assert len(re.findall(r"<tr data-ref=", second)) == 5 and 'rel="prev"' in second
    assert c.get("/adapters?page=99").status_code == 200  # past the end: the last page


def test_version_page_card_evals_lineage(client, reg):
    page = client.get("/v/zh@2").text
    v = reg.get("zh@2")
    assert v.base_fingerprint in page and "dataset sha256" in page
    for f in v.files:
        assert f.sha256 in page and f.path in page
    assert "lineage.recipe" in page and "metrics.train_loss" in page
    assert 'id="evals"' in page and "translate_zh_en.jsonl" in page and "loss_tokens" in page
    svg = re.search(r"<svg class=\"lineage\".*?</svg>", page, re.S).group(0)
    assert '<a href="/v/zh@1">' in svg and 'data-ref="base:tiny"' in svg
    assert 'href="/v/zh@2"' not in svg  # itself: not a link
    blend = client.get("/v/blend@1").text
    assert '<a href="/v/a@1">' in blend and '<a href="/v/b@1">' in blend and "×0.7" in blend
    tagged = client.get("/v/zh@prod").text
    assert '<h1 id="ref">zh@1' in tagged and '<span class="tag">prod</span>' in tagged


def test_removed_parent_drawn_unlinked_and_removed_version_is_404(client):
    page = client.get("/v/card@1").text
    assert 'class="node removed" data-ref="gone@1"' in page and 'href="/v/gone@1"' not in page
    r = client.get("/v/gone@1")
    assert r.status_code == 404 and "gone" in reason(r.text)


@pytest.mark.parametrize(
    ("url", "status"),
    [("/v/nope", 404), ("/v/zh@99", 404), ("/v/zh@nosuchtag", 404), ("/v/Bad..name", 400),
     ("/nothing", 404), ("/adapters?page=0", 400), ("/adapters?page=x", 400),
     ("/curves?ref=nope", 404), ("/compare?ref=zh@1&data=" + "0" * 64, 404),
     ("/compare?ref=" + ",".join(f"zh@{i}" for i in range(1, 11)), 400),
     ("/playground?ref=nope@x@y", 200)],
)  # fmt: skip
def test_bad_input_is_a_page_with_one_line(client, url, status):
    r = client.get(url)
    assert r.status_code == status, r.text[:300]
    if status != 200:
        assert "\n" not in reason(r.text).strip() and "Traceback" not in r.text
        j = client.get(url, headers={"accept": "application/json"})
        assert j.status_code == status and j.json()["error"]["message"]


def test_curves_page_series(client):
    page = client.get("/curves?ref=zh@1&ref=zh@2&ref=a@1").text
    chart = json.loads(re.search(r'id="chart-data">(.*?)</script>', page, re.S).group(1))
    assert chart["labels"] == ["zh@1 loss", "zh@1 eval_loss", "zh@2 loss", "zh@2 eval_loss"]
    assert len(chart["data"]) == 5 and chart["data"][0] == sorted(chart["data"][0])
    assert all(len(col) == len(chart["data"][0]) for col in chart["data"])
    assert "a@1 has no stored training log" in page
    assert 'data-series="4"' in page and "/static/vendor/uPlot.iife.min.js" in page


def test_compare_marks_best_and_shows_settings(client, reg):
    from adaptr.evaluation.compare import compare

    page = client.get("/compare?ref=zh@1,zh@2").text
    doc = compare(reg, ["zh@1", "zh@2"])
    best = doc["best"]["loss"][0]
    row = re.search(rf'<a href="/v/{best}">.*?</tr>', page, re.S).group(0)
    assert 'class="num best"' in row and doc["sha256"] in page
    assert 'id="settings"' in page and "format=alpaca" in page
    chosen = client.get(f"/compare?ref=zh@1&ref=zh@2&data={doc['sha256']}").text
    assert 'class="num best"' in chosen


def test_playground_page_lists_refs_and_base(client):
    page = client.get("/playground?ref=a@1&ref=b@1").text
    assert 'value="base:tiny"' in page and 'value="a@1" checked' in page
    assert "(loaded)" not in page


def test_empty_and_missing_registry(tmp_path):
    from adaptr.registry import Registry
    from adaptr.ui import create_app

    c = TestClient(create_app(Registry(tmp_path / "nowhere")))
    page = c.get("/adapters").text
    assert "no registry at" in page and not (tmp_path / "nowhere").exists()
    for url in ("/curves", "/compare", "/playground"):
        assert c.get(url).status_code == 200
    assert c.get("/v/x").status_code == 404


def test_static_assets_are_in_the_package(client):
    for path in ("ui.css", "ui.js", "vendor/htmx.min.js", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):  # fmt: skip
        assert client.get(f"/static/{path}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404
    page = client.get("/adapters").text
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing external


# ------------------------------------------------------------------ hostile input
def test_nothing_hostile_is_reflected(client):
    pages = [client.get(u).text for u in ("/v/card@1", "/adapters?q=" + HOSTILE,
             "/compare?ref=card@1", f"/v/{HOSTILE}", "/curves?ref=card@1")]  # fmt: skip
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in pages[0]  # shown, as text
    assert client.get("/v/card@1").headers["content-security-policy"].startswith("default-src 'self'")  # fmt: skip


# ------------------------------------------------------------------ writes
def test_writes_need_the_csrf_token_and_same_origin(client, reg):
    token = csrf(client)
    assert client.post("/v/a@1/tag", data={"tag": "x1"}).status_code == 403
    assert client.post("/v/a@1/tag", data={"tag": "x1", "csrf": "wrong"}).status_code == 403
    evil = {"origin": "http://evil.example", "x-csrf-token": token}
    r = client.post("/v/a@1/tag", data={"tag": "x1"}, headers=evil)
    assert r.status_code == 403 and "another origin" in reason(r.text)
    assert "x1" not in reg.get("a@1").tags
    ok = client.post("/v/a@1/tag", data={"tag": "x1", "csrf": token}, headers={"origin": "http://testserver"})  # fmt: skip
    assert ok.status_code in (200, 303) and "x1" in reg.get("a@1").tags
    row = re.search(r'<tr data-ref="a@1">.*?</tr>', client.get("/adapters").text, re.S).group(0)
    assert '<span class="tag">x1</span>' in row  # the page sees the write at once
    assert client.post("/playground/stream", content=b"{}").status_code == 403


def test_gated_tag_move_refused_then_allowed(client, reg):
    token, hx = csrf(client), {"HX-Request": "true"}
    worse, better = sorted(["zh@1", "zh@2"], key=lambda r: reg.evals(r)[-1]["metrics"]["loss"])[::-1]  # fmt: skip
    reg.tag(better, "gold")
    form = {"tag": "gold", "better_than": "gold", "csrf": token}
    check = client.post(f"/v/{worse}/gate", data=form, headers=hx).text
    assert 'class="outcome refused"' in check and "loss" in check
    moved = client.post(f"/v/{worse}/tag", data=form, headers=hx).text
    assert 'class="outcome refused"' in moved and "the tag was not moved" in moved
    assert reg.get("zh@gold").ref == better
    loose = {"tag": "gold", "require": "loss<=1000", "csrf": token}
    assert "the gate passes" in client.post(f"/v/{worse}/gate", data=loose, headers=hx).text
    assert reg.get("zh@gold").ref == better  # checking moved nothing
    done = client.post(f"/v/{worse}/tag", data=loose, headers=hx).text
    assert 'class="outcome ok"' in done and "gate passed" not in done and "loss" in done
    assert reg.get("zh@gold").ref == worse
    bad = client.post("/v/zh@1/tag", data={"tag": "1", "csrf": token}, headers=hx).text
    assert "cannot be all digits" in bad


def test_switch_and_clear(client, reg):
    token, hx = csrf(client), {"HX-Request": "true"}
    r = client.post("/v/a@1/switch", data={"mode": "only", "as": "a", "csrf": token}, headers=hx)
    assert "tiny: active a" in r.text and reg.active()["tiny"] == ["a"]
    client.post("/v/b@1/switch", data={"mode": "add", "csrf": token}, headers=hx)
    assert reg.active()["tiny"] == ["a", "b@1"]
    r = client.post("/v/card@1/switch", data={"as": "nope", "csrf": token}, headers=hx)
    assert r.status_code == 404
    client.post("/switch/clear", data={"base": "tiny", "csrf": token})
    assert reg.active().get("tiny", []) == []


# ------------------------------------------------------------------ token, hosts
def test_token_and_host_guards(reg):
    from adaptr.ui import create_app

    c = TestClient(create_app(reg, token="s3cret"))
    r = c.get("/adapters")
    assert r.status_code == 401 and 'action="/login"' in r.text
    assert c.get("/static/ui.css").status_code == 200
    assert c.get("/adapters", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/login", data={"token": "nope"}).status_code == 401
    assert c.post("/login", data={"token": "s3cret"}, follow_redirects=False).status_code == 303
    assert c.get("/adapters").status_code == 200  # the cookie
    rebound = TestClient(create_app(reg), base_url="http://evil.example")
    assert rebound.get("/adapters").status_code == 400


def test_cli_refuses_open_host_without_token(cli, home):
    code, _, err = cli("ui", "--host", "0.0.0.0")
    assert code != 0 and "--token" in err and len(err.strip().splitlines()) == 1


def test_ui_help_and_app_import_no_heavy_modules(home):
    import subprocess

    probe = (
        "import sys\nfrom adaptr.cli import main\nfrom adaptr.ui import create_app\n"
        "from adaptr.registry import Registry\nfrom starlette.testclient import TestClient\n"
        f"c = TestClient(create_app(Registry({str(home)!r})))\n"
        "assert c.get('/adapters').status_code == 200 and c.get('/playground').status_code == 200\n"
        "code = main(['ui', '--help'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stderr[-2000:]


# ------------------------------------------------------------------ the playground stream
def events(body: str) -> list[tuple[str, dict]]:
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            kind = re.search(r"^event: (\w+)$", block, re.M)
            data = re.search(r"^data: (.*)$", block, re.M).group(1)
            out.append((kind.group(1) if kind else "message", json.loads(data)))
    return out


def test_playground_streams_the_servers_greedy_answers(client, reg):
    from adaptr.serving import AdapterServer

    token = csrf(client)
    body = {"prompt": PROMPT, "refs": ["a@1", "b@1", "base:tiny"], "max_tokens": 8}
    r = client.post("/playground/stream", json=body, headers={"x-csrf-token": token})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r.text)
    texts = ["", "", ""]
    for kind, d in got:
        if kind == "message":
            texts[d["i"]] += d["text"]
    assert got[0][0] == "start" and got[-1][0] == "done"
    assert sum(k == "message" for k, _ in got) > 3  # piece by piece
    want = AdapterServer(reg, "tiny").generate([PROMPT] * 3, ["a@1", "b@1", None], max_new_tokens=8)
    assert texts == want and texts[0] != texts[1]
    assert "(loaded)" in client.get("/playground").text


@pytest.mark.parametrize(
    ("body", "match"),
    [({"prompt": "", "refs": ["a@1"]}, "prompt"), ({"prompt": "x", "refs": []}, "refs"),
     ({"prompt": "x", "refs": ["a@1"], "temperature": 5}, "temperature"),
     ({"prompt": "x", "refs": ["a@1"], "max_tokens": 0}, "max_tokens"),
     ({"prompt": "x", "refs": ["a@1"], "max_tokens": "9"}, "max_tokens"),
     ({"prompt": "x", "refs": ["nope"]}, "unknown adapter"),
     ({"prompt": "x", "refs": ["a@1", "base:other"]}, "one base"), ("[1]", "JSON object")],
)  # fmt: skip
def test_playground_bad_requests(client, body, match):
    token = csrf(client)
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post("/playground/stream", headers={"x-csrf-token": token, "accept": "application/json"}, **kw)  # fmt: skip
    assert 400 <= r.status_code < 500 and match in r.json()["error"]["message"]
