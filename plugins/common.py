"""What the built-in families share: projection names, LoRA defaults, tiny sizes, chat templates.

Assistant turns in the templates are wrapped in ``{% generation %}`` so TRL's
``assistant_only_loss`` can mask everything else; tool calls are part of the assistant turn
(trained), tools and tool results are not. Every template renders ``tools``, ``tool_calls``
and ``tool`` messages (``adaptr.data.chat.check_template`` refuses a template that drops them),
and renders earlier turns the same whatever follows (TRL's prefix-preservation check).
"""

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
# hidden 32, 2 layers, grouped-query attention: enough structure for smoke tests
TINY_GQA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _newlines(template: str) -> str:
    """``template`` with each newline that follows a tag written as ``{{ '\\n' }}``:
    transformers renders chat templates with ``trim_blocks``, which drops a newline written
    right after ``%}``."""
    return template.replace("%}\n", "%}{{ '\\n' }}")


# A tool call's arguments: an object as JSON (what transformers' templates take); a string
# (OpenAI's wire form, if a plugin formatter passes one) as it is.
_ARGS = (
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}"
)
_CALL = (
    "{% set f = c.function if c.function else c %}"
    '{"name": "{{ f.name }}", "arguments": ' + _ARGS + "{{ '}' }}"
)

# ChatML with Qwen2.5's tool layout: the tools in the system turn inside <tools></tools>, each
# call as <tool_call>{"name": …, "arguments": …}</tool_call> in the assistant turn (inside the
# generation block, so calls are trained), consecutive tool results in one user turn as
# <tool_response>…</tool_response>. Unlike Qwen's own template, no default system prompt.
CHATML = _newlines(
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first and tools %}"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}{% if not loop.first or m['content'] %}\n{% endif %}"
    "<tool_call>\n" + _CALL + "\n</tool_call>{% endfor %}<|im_end|>{% endgeneration %}\n"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaMA-2 [INST] turns, with Mistral's tool layout (the llama family covers Mistral):
# "[AVAILABLE_TOOLS] [tools as JSON][/AVAILABLE_TOOLS]" after the first BOS, an assistant's
# calls as "[TOOL_CALLS] [{"name": …, "arguments": …}, …]" before its EOS (inside the
# generation block), a tool result as "[TOOL_RESULTS] …[/TOOL_RESULTS]".
LLAMA2 = _newlines(
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% endif %}"
    "{% set ns = namespace(tools=tools, system=system) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}"
    "{% if ns.tools %}[AVAILABLE_TOOLS] {{ ns.tools | tojson }}[/AVAILABLE_TOOLS]{% set ns.tools = none %}{% endif %}"
    "[INST] {% if ns.system %}<<SYS>>\n{{ ns.system }}\n<</SYS>>\n\n{% set ns.system = none %}{% endif %}"
    "{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{% generation %} {{ m['content'] or '' }}"
    "{% if m['tool_calls'] %}{% if m['content'] %} {% endif %}[TOOL_CALLS] ["
    "{% for c in m['tool_calls'] %}{% if not loop.first %}, {% endif %}" + _CALL + "{% endfor %}]"
    "{% endif %} {{ eos_token }}{% endgeneration %}"
    "{% elif m['role'] == 'tool' %}[TOOL_RESULTS] {{ m['content'] }}[/TOOL_RESULTS]"
    "{% endif %}{% endfor %}"
)

# "User:"/"Assistant:" turns (DeepSeek-LLM chat; Pythia has no chat format of its own): the
# tools listed after the system prompt, an assistant's calls as
# <tool_call>{"name": …, "arguments": …}</tool_call> before its EOS (inside the generation
# block), a tool result as a "Tool:" turn.
PLAIN = _newlines(
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% set messages = messages[1:] %}{% endif %}"
    '{% if tools %}Tools (to call one, write <tool_call>{"name": …, "arguments": {…}}</tool_call>):\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {% generation %}{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}{% if not loop.first or m['content'] %}\n{% endif %}"
    "<tool_call>" + _CALL + "</tool_call>{% endfor %}"
    "{{ eos_token }}{% endgeneration %}"
    "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEEPSEEK = "{{ bos_token }}" + PLAIN
