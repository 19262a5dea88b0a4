"""adaptr/serving/server.py: adapters whose init rewrites the base (PiSSA, OLoRA, …) are served
exactly as PEFT loads them or refused, alike on every path (server, eval, vLLM check)."""

from __future__ import annotations

import json

import pytest

from adaptr.errors import InvalidAdapterError, InvalidInputError
from adaptr.registry import Registry


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
