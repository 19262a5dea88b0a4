"""Structured output's cost: constrained vs unconstrained decoding on the same load, one run.

Run: python bench/constrained.py [--hidden 512] [--layers 6] [--vocab 32000] [--requests 32]
     [--repeat 3]

A burst of ``--requests`` requests over two rank-8 adapters (the scheduler, in process,
fp32) with ``response_format`` a JSON schema (an object with a bounded string and an array
of integers), then the same burst unconstrained, each request generating exactly as many
tokens as its constrained twin did (``ignore_eos``), in turns, ``--repeat`` times. Printed:
tokens/s of each, the median per-token latency (a request's time over its tokens) and the
ratios (target: constrained per-token latency <= 1.3x). ``--vocab N`` trains a byte-level
BPE of N tokens on the standard library's sources (a real vocabulary's mask cost: the
masks are computed over every token); ``--vocab 0`` keeps the tiny 260-token tokenizer.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 8,
            "maxItems": 8,
        },
        "done": {"type": "boolean"},
    },
    "required": ["title", "scores", "done"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA, "strict": True}}  # fmt: skip


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000, help="0: the tiny byte-level tokenizer")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    return ap.parse_args()


def tokenizer(vocab: int):
    """The tiny tokenizer, or a byte-level BPE of ``vocab`` tokens trained on the stdlib."""
    from adaptr.tiny import SPECIAL_TOKENS, make_tokenizer

    tok = make_tokenizer()
    if not vocab:
        return tok
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")  # fmt: skip
    fast.chat_template = tok.chat_template
    return fast


def build(args: argparse.Namespace, work: Path):
    """A registry with the base and two adapters, and its server (adapters loaded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.tiny import save_tiny_base

    tok = tokenizer(args.vocab)
    heads = max(4, args.hidden // 64)
    base = save_tiny_base(work / "base", "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                          num_hidden_layers=args.layers, num_attention_heads=heads,
                          num_key_value_heads=heads, vocab_size=len(tok))  # fmt: skip
    tok.save_pretrained(base)  # (over the tiny one)
    reg = Registry(work / "home")
    reg.add_base("base", base)
    refs = []
    for i in range(2):
        torch.manual_seed(i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
        m.save_pretrained(work / f"a{i}")
        refs.append(reg.add(f"task-{i}", work / f"a{i}", base="base").ref)
    server = AdapterServer(reg, "base", max_adapters=4, dtype="float32")
    for r in refs:
        server.load(r)
    return server, refs


def burst(server, requests) -> tuple[float, list[float]]:
    """Submit ``requests`` at once; (wall seconds, each one's seconds per token)."""
    t0 = time.perf_counter()
    ends: dict[int, float] = {}

    def ended(i):
        return lambda event: ends.setdefault(i, time.perf_counter()) if event[0] in ("end", "error") else None  # fmt: skip

    for i, r in enumerate(requests):
        r.on_event = ended(i)
    server.enqueue(requests)
    for r in requests:
        r.wait(600)
    wall = time.perf_counter() - t0
    return wall, [(ends[i] - t0) / max(1, r.completion_tokens) for i, r in enumerate(requests)]


def main() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    from adaptr.serving.constrain import compile_format, parse_response_format
    from adaptr.serving.requests import Request

    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        server, refs = build(args, Path(tmp))
        vocab = server.model.get_output_embeddings().weight.shape[0]
        t = time.perf_counter()
        grammar = compile_format(server.tokenizer, vocab, parse_response_format(FORMAT))
        compiled = time.perf_counter() - t
        prompts = [server.tokenizer(f"Report {i}: the quick brown fox").input_ids for i in range(args.requests)]  # fmt: skip

        def constrained():
            return [Request(p, refs[i % 2], 256, constraint=grammar.guide()) for i, p in enumerate(prompts)]  # fmt: skip

        burst(server, constrained()[:4])  # warm-up (and the grammar's first masks)
        sides: dict[str, list] = {"constrained": [], "unconstrained": []}
        lengths: list[int] = []
        complete = 0  # constrained answers that reached the schema's end (the others: 256 tokens)
        for _ in range(args.repeat):
            reqs = constrained()
            wall, per = burst(server, reqs)
            lengths = [r.completion_tokens for r in reqs]
            complete += sum(r.finish == "stop" for r in reqs)
            sides["constrained"].append((wall, per, sum(lengths)))
            free = [Request(p, refs[i % 2], n, ignore_eos=True) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]  # fmt: skip
            wall, per = burst(server, free)
            sides["unconstrained"].append((wall, per, sum(r.completion_tokens for r in free)))
        print(f"vocab {vocab}, hidden {args.hidden} x {args.layers} layers, {args.requests} requests "
              f"(2 adapters), {statistics.mean(lengths):.0f} tokens each on average ({complete} of {args.requests * args.repeat} "
              f"constrained answers complete); schema compiled in {compiled * 1000:.0f} ms")  # fmt: skip
        figures = {}
        for name, runs in sides.items():
            rate = statistics.median(n / wall for wall, _, n in runs)
            p50 = statistics.median(statistics.median(per) for _, per, _ in runs)
            figures[name] = (rate, p50)
            print(f"  {name:>13}: {rate:7.1f} tokens/s, per-token latency p50 {p50 * 1000:6.1f} ms")
        (c_rate, c_p50), (u_rate, u_p50) = figures["constrained"], figures["unconstrained"]
        print(f"  constrained / unconstrained: per-token latency {c_p50 / u_p50:.2f}x, "
              f"throughput {c_rate / u_rate:.2f}x (target: latency <= 1.3x)")  # fmt: skip


if __name__ == "__main__":
    main()
