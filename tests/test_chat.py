"""bigmodel chat: an imported tiny instruct model (random llama weights, a trained BPE tokenizer and a
ChatML template) renders the prompt exactly as transformers' apply_chat_template does, answers
several turns read from stdin, drops the oldest turns when the window is full, survives a Ctrl-C
in an answer, and every bad input is one line, exit 2."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from conftest import assert_one_error_line, export_once  # noqa: E402
torch = pytest.importorskip("torch")

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = ["Hello there, how are you today?", "I am fine, thank you. What is the weather like?",
        "def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."]
WINDOW = 128
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "I am fine"}, {"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory, one_torch_thread):
    """(Hugging Face checkpoint directory, the artifact `bigmodel import` made of it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from typer.testing import CliRunner

    from bigmodel_cli.cli import app

    root = tmp_path_factory.mktemp("chat")
    source = root / "hf"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=WINDOW, tie_word_embeddings=True)).save_pretrained(source)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    result = CliRunner().invoke(app, ["import", str(source), "--out", str(root / "art")])
    assert result.exit_code == 0, result.output
    return source, root / "art"


def chat(*args, input: str = ""):
    """`bigmodel chat ARGS` with ``input`` on stdin (not a terminal: one message a line)."""
    from typer.testing import CliRunner

    from bigmodel_cli.cli import app

    return CliRunner().invoke(app, ["chat", *(str(a) for a in args)], input=input)


def session(artifact: Path, **generate):
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.chat import ChatOptions, ChatSession
    from bigmodel_cli.engine.generate import GenerateConfig

    cfg = GenerateConfig(prompt="", **{"max_new_tokens": 6, "temperature": 0, **generate})
    return ChatSession(open_artifact(artifact), ChatOptions(generate=cfg))


def test_prompt_is_what_transformers_renders_and_tokenizes(instruct):
    source, art = instruct
    reference = transformers.AutoTokenizer.from_pretrained(source)
    ours = session(art)
    for n in (2, 4):  # with and without an earlier turn
        expected = reference.apply_chat_template(MESSAGES[:n], tokenize=False, add_generation_prompt=True)
        prompt = ours.template.render(MESSAGES[:n])
        assert prompt == expected and prompt.startswith("<s><|im_start|>system")
        ids = reference.apply_chat_template(MESSAGES[:n], tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.encode(prompt) == list(ids)  # BOS once: the template's, none added on top
    # answers end at the EOS token and at the template's end of turn
    assert ours.stops == ("</s>", "<|im_end|>")


def test_templates_with_transformers_extras_render_as_transformers_does(instruct, tmp_path):
    """The `generation` tag, loop controls, namespace, tojson and strftime_now's presence."""
    source, art = instruct
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}{{ ns.n }} {{ m | tojson }}\n{% if m.role == 'assistant' %}"
                "{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}"
                "{% if strftime_now is defined %}{{ eos_token }}{% endif %}")
    reference = transformers.AutoTokenizer.from_pretrained(source)
    expected = reference.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert "I am fine" in expected and expected.endswith("</s>")
    path = tmp_path / "extras.jinja"
    path.write_text(template)
    from bigmodel_cli.artifact import open_artifact
    from bigmodel_cli.engine.chat import load_template

    assert load_template(open_artifact(art), path).render(MESSAGES) == expected


def test_turns_from_stdin_keep_the_conversation(instruct):
    _, art = instruct
    result = chat(art, "--json", "--temperature", "0", "-n", "3", "--system", "Be brief.",
                  input="Hello there\n\nhow are you\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    transcript = json.loads(result.stdout)
    assert [t["user"] for t in transcript["turns"]] == ["Hello there", "how are you"]
    first, second = transcript["turns"]
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]  # the first turn is in it
    assert transcript["system"] == "Be brief." and transcript["stops"] == ["</s>", "<|im_end|>"]
    assert all(t["new_tokens"] <= 3 and "<|im_end|>" not in t["assistant"] for t in transcript["turns"])
    streamed = chat(art, "--temperature", "0", "-n", "3", "--system", "Be brief.", input="Hello there\nhow are you\n")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == "".join(t["assistant"] + "\n" for t in transcript["turns"])


def test_onnx_runtime_gives_pytorchs_answers(instruct, tmp_path_factory):
    _, art = instruct
    # model.onnx, decoder.onnx and a copy of the weights; TorchScript exports this in half dynamo's time
    export = export_once(tmp_path_factory, art, "--exporter", "torchscript")
    args, messages = ("--json", "-n", "6", "--temperature", "1", "--seed", "3"), "Hello there\nhow are you\n"
    runs = {backend: chat(export, *args, "--backend", backend, input=messages) for backend in ("torch", "onnx")}
    assert all(run.exit_code == 0 for run in runs.values()), [run.output for run in runs.values()]
    torch_turns, onnx_turns = (json.loads(runs[b].stdout) for b in ("torch", "onnx"))
    assert onnx_turns["backend"] == "onnx" and torch_turns["backend"] == "torch"
    assert [t["assistant"] for t in onnx_turns["turns"]] == [t["assistant"] for t in torch_turns["turns"]]


def test_oldest_turns_are_dropped_when_the_window_is_full(instruct):
    _, art = instruct
    line = "The quick brown fox jumps over the lazy dog."  # the window is WINDOW tokens
    result = chat(art, "--json", "--temperature", "0", "-n", "4", "--system", "Be brief.", input=f"{line}\n" * 8)
    assert result.exit_code == 0, result.output
    turns = json.loads(result.stdout)["turns"]
    assert len(turns) == 8 and turns[-1]["dropped_turns"] >= 1 and turns[0]["dropped_turns"] == 0
    assert all(t["prompt_tokens"] <= WINDOW - 4 for t in turns)
    assert result.stderr.count("outgrew the model's window") == 1  # said once, not every turn


def test_a_message_longer_than_the_window_is_one_error(instruct):
    _, art = instruct
    result = chat(art, "-n", "4", input="hi\n" + "the quick brown fox " * 60 + "\n")
    assert_one_error_line(result, "this message is", f"window of {WINDOW}", "shorten it")
    # with --json, the turn answered before it is still printed
    result = chat(art, "-n", "4", "--json", input="hi\n" + "the quick brown fox " * 60 + "\n")
    assert_one_error_line(result, "this message is")
    assert [t["user"] for t in json.loads(result.stdout)["turns"]] == ["hi"]


def test_on_a_terminal_a_bad_message_does_not_end_the_session(instruct, monkeypatch):
    """Typed messages: a message too long for the window is one error line and the session goes
    on; Ctrl-C at the prompt ends it with exit 0."""
    import builtins

    from bigmodel_cli.cli import chat as cli_chat

    typed = iter(["Hello there", "the quick brown fox " * 60, "", "how are you"])

    def type_next() -> str:
        line = next(typed, None)
        if line is None:
            raise KeyboardInterrupt  # Ctrl-C at the prompt
        return line

    monkeypatch.setattr(cli_chat, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(builtins, "input", type_next)
    _, art = instruct
    result = chat(art, "--json", "-n", "3")
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)["turns"]
    assert (first["user"], second["user"]) == ("Hello there", "how are you")
    # the refused message took nothing away: the first turn is still in the second's prompt
    assert second["dropped_turns"] == 0 and second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]  # after a "> " prompt
    assert len(errors) == 1 and "this message is" in errors[0], result.stderr


def test_ctrl_c_stops_the_answer_not_the_session(instruct):
    _, art = instruct
    chat_session = session(art, max_new_tokens=8)
    shown = []

    def interrupt_once(chunk: str) -> None:
        shown.append(chunk)
        if len(shown) == 1:
            raise KeyboardInterrupt

    turn = chat_session.ask("Hello there", on_text=interrupt_once)
    assert turn["interrupted"] and turn["new_tokens"] < 8
    assert chat_session.history[-1] == {"role": "assistant", "content": turn["assistant"]}  # kept as far as it got
    again = chat_session.ask("how are you")
    assert not again["interrupted"] and again["prompt_tokens"] > turn["prompt_tokens"]


def test_template_file_for_a_model_without_one(cli, tiny_gpt, tmp_path):
    assert_one_error_line(cli("chat", tiny_gpt), "no chat template", "bigmodel generate", "--template")
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    result = chat(tiny_gpt, "--template", template, "--json", "-n", "5", input="def f(x):\n")
    assert result.exit_code == 0, result.output
    turn = json.loads(result.stdout)["turns"][0]
    assert turn["prompt_tokens"] == len(b"user: def f(x):\nassistant:") and turn["new_tokens"] == 5
    # A template that ends each turn with "e": the answer stops before the first "e" the model writes.
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}e\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    result = chat(tiny_gpt, "--template", template, "--json", "-n", "60", "--temperature", "1", input="def f(x):\n")
    assert result.exit_code == 0, result.output
    transcript = json.loads(result.stdout)
    turn = transcript["turns"][0]
    assert transcript["stops"] == ["e"] and turn["stopped"] and "e" not in turn["assistant"], turn


def test_non_language_model_is_refused(cli, digits_mlp):
    assert_one_error_line(cli("chat", digits_mlp), "classifier", "language model")


@pytest.mark.parametrize("template, fragments", [
    ("{% for m in messages %}{{ m.content }", ["syntax error on line 1"]),
    ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}x",
     ["refused the conversation", "System role not supported"]),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["stopped by the sandbox"]),
    ("{{ messages.append(messages) }}", ["stopped by the sandbox"]),
    ("{{ messages[0].nothing.deeper }}", ["failed to render", "UndefinedError"]),
    ("{{ 2 ** 100000000 }}", ["stopped by the sandbox", "exponent"]),
    ("{{ messages[0]['content'] + 1 }}", ["failed to render", "TypeError"]),
])
def test_template_that_cannot_render_is_one_line(tiny_gpt, tmp_path, template, fragments):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert_one_error_line(chat(tiny_gpt, "--template", path, "--system", "hi", input="x\n"), *fragments)


def test_template_that_loops_without_end_is_stopped(tiny_gpt, tmp_path, monkeypatch):
    from bigmodel_cli.engine import chat as engine_chat

    monkeypatch.setattr(engine_chat, "RENDER_SECONDS", 0.3)
    path = tmp_path / "t.jinja"
    path.write_text("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}")
    assert_one_error_line(chat(tiny_gpt, "--template", path, input="x\n"), "ran for more than 0.3 s")


RENDER_IN_A_SUBPROCESS = """
import sys
from bigmodel_cli.engine.chat import ChatTemplate
from bigmodel_cli.errors import UserError
for source in sys.argv[1:]:
    try:
        ChatTemplate(source, "t", {}, "t").render([{"role": "user", "content": "x"}])
        print("rendered")
    except UserError as exc:
        print(exc)
"""
HUGE = {  # template → what its one line says
    "{{ 'x' * 10000000000 }}": "stopped by the sandbox",
    "{{ 'x' + 'y' * 1048576 }}": "stopped by the sandbox",
    "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'yyyyyyyyyy' }}{% endfor %}{% endfor %}":
        "more than 1,048,576 characters",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s|length }}": "more than 256 MiB of memory",
    "{{ 'x'.ljust(10000000000) }}": "more than 256 MiB of memory",
}


def test_template_that_builds_a_huge_prompt_is_stopped_under_a_memory_limit():
    """Every way to build a giant prompt is refused (before it is built, or by the render's own
    address-space limit); run under a 3 GB limit, so that a regression fails here rather than eat
    the machine."""
    limit = 3 << 30
    run = subprocess.run([sys.executable, "-c", RENDER_IN_A_SUBPROCESS, *HUGE], capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(HUGE), run.stdout
    for line, fragment in zip(lines, HUGE.values()):
        assert fragment in line, line


def test_template_file_problems(tiny_gpt, tmp_path):
    assert_one_error_line(chat(tiny_gpt, "--template", tmp_path / "absent.jinja"), "no such file")
    assert_one_error_line(chat(tiny_gpt, "--template", tmp_path), "not a regular file")
    big = tmp_path / "big.jinja"
    big.write_bytes(b" " * ((1 << 20) + 1))
    assert_one_error_line(chat(tiny_gpt, "--template", big), "more than the 1,048,576 bytes")
    binary = tmp_path / "bin.jinja"
    binary.write_bytes(b"\xff\xfe{{ x }}")
    assert_one_error_line(chat(tiny_gpt, "--template", binary), "not UTF-8")


def test_bad_options_are_one_line(instruct):
    _, art = instruct
    assert_one_error_line(chat(art, "--top-p", "0"), "--top-p")
    assert_one_error_line(chat(art, "--system", " "), "--system must not be empty")
    assert_one_error_line(chat(art, "--backend", "onnx"), "has no model.onnx")
