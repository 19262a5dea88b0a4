"""Multi-task serving: one base, several adapters, a different adapter per request.

Python API (AdapterServer) and the OpenAI-compatible HTTP server with the `openai` client.
Run after the demo, on its registry:

    python examples/demo.py --out demo-out
    python examples/multi_task_serving.py --home demo-out/registry
"""

from __future__ import annotations

import argparse

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30

PROMPTS = {
    "quotes": "Knowledge is",
    "zh-en": "### 指令:\n把下面的中文翻译成英文。\n\n### 输入:\n猫\n\n### 回答:\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--home", default="demo-out/registry")
    ap.add_argument("--base", default="tiny-llama")
    args = ap.parse_args()

    from adaptr.registry import Registry
    from adaptr.runtime import quiet_libraries
    from adaptr.serving import AdapterServer

    quiet_libraries()
    registry = Registry(args.home)
    server = AdapterServer(registry, args.base, max_adapters=8)

    # 1. Python: one batch, one adapter per prompt (None = the bare base)
    prompts = [PROMPTS["quotes"], PROMPTS["zh-en"], PROMPTS["zh-en"]]
    for adapter, text in zip(
        ["quotes", "zh-en", None],
        server.generate(prompts, ["quotes", "zh-en", None], max_new_tokens=12),
        strict=True,
    ):
        print(f"[python] {adapter or 'base':<7} -> {text!r}")
    print(
        "[python] streamed:", "|".join(server.stream(PROMPTS["zh-en"], "zh-en", max_new_tokens=6))
    )

    # 2. HTTP: the same server behind the OpenAI API, driven by the official client
    import openai

    from adaptr.serving.openai.app import create_app, serve_in_thread

    # on a port the system chooses, in a thread; stopped at the end of the block
    try:
        with serve_in_thread(
            create_app(server), start_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S
        ) as url:
            client = openai.OpenAI(base_url=url, api_key="unused")
            print("[http] models:", [m.id for m in client.models.list().data])
            for model in ("quotes", "zh-en"):
                out = client.completions.create(model=model, prompt=PROMPTS[model], max_tokens=12)
                print(f"[http] {model:<7} -> {out.choices[0].text!r}")
            stream = client.completions.create(
                model="zh-en", prompt=PROMPTS["zh-en"], max_tokens=6, stream=True
            )
            print("[http] streamed:", "|".join(c.choices[0].text for c in stream))
    except RuntimeError as e:  # the server did not start, or did not stop
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
