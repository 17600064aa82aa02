"""`mixtral-jax generate`, `chat` and `score` through the CLI entry point: transformers' greedy tokens and
log-probs, the built-in default model, chat history, and one-line errors."""

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixtral_jax.api import Mixtral
from mixtral_jax.cli import _common, main
from mixtral_jax.cli.chat import SAFE_PROMPT
from tests import reference
from tests.test_generate import NEW, PROMPTS, hf_greedy

CLI = str(Path(sys.executable).with_name("mixtral-jax"))
README_PROMPT = "def fibonacci(n):"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _ids(prompt) -> str:
    return ",".join(map(str, prompt))


def test_cli_greedy_json_equals_transformers_generate(capsys, hf_mixtral):
    args = [a for p in PROMPTS for a in ("--ids", _ids(p))]
    code, out, _ = _run(capsys, "generate", "--checkpoint", str(hf_mixtral), *args, "--temperature", "0",
                        "--json", "--dtype", "float32", "--max-new-tokens", str(NEW))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt_ids"] for line in lines] == PROMPTS
    assert [line["ids"] for line in lines] == hf_greedy(hf_mixtral, tuple(map(tuple, PROMPTS)), NEW)  # 3 x 24


def test_cli_score_json_is_within_2e_4_of_transformers_logprobs(capsys, hf_mixtral):
    ids = np.random.default_rng(0).integers(0, 96, 37).tolist()
    code, out, _ = _run(capsys, "score", "--checkpoint", str(hf_mixtral), "--ids", _ids(ids), "--json",
                        "--dtype", "float32")
    assert code == 0
    result = json.loads(out)
    ref = reference.hf_logprobs(hf_mixtral, np.asarray([ids]))[0][np.arange(len(ids) - 1), ids[1:]]
    assert result["ids"] == ids
    assert np.abs(np.asarray(result["logprobs"]) - ref).max() <= 2e-4
    assert abs(result["nll"] + ref.mean()) <= 2e-4
    assert abs(result["perplexity"] - math.exp(result["nll"])) <= 1e-9 * result["perplexity"]


@pytest.fixture(scope="module")
def default_model():
    """The built-in default model, made once for the tests that run it in this process."""
    return _common.load_model(argparse.Namespace(checkpoint=None, dtype=None, mesh=None, backend=None, quantize=None,
                                                 quant_group=None, quantize_vocab=False, kv_cache_dtype=None))


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return _common.tokenizer_for(default_model, None)


@pytest.fixture(scope="module")
def default_json(default_model):
    """`generate --json` on the README prompt with the built-in default model."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "load_model", lambda args: default_model)
        mp.setattr(sys, "stdout", out)
        assert main(["generate", "--prompt", README_PROMPT, "--max-new-tokens", "8", "--json"]) == 0
    return json.loads(out.getvalue())


def test_default_model_runs_with_a_tokenizer_and_no_checkpoint(tokenizer, default_json):
    assert default_json["prompt_ids"] == tokenizer.encode(README_PROMPT)
    new = default_json["ids"]
    assert len(new) == 8 or (0 < len(new) < 8 and new[-1] == tokenizer.eos_id)
    assert default_json["text"] == tokenizer.decode(new)


def test_generate_chat_sends_the_prompt_as_a_user_message(capsys, monkeypatch, default_model, tokenizer):
    monkeypatch.setattr(_common, "load_model", lambda args: default_model)
    code, out, _ = _run(capsys, "generate", "--chat", "--prompt", "Hi", "--max-new-tokens", "7", "--json")
    line = json.loads(out)
    assert code == 0
    assert line["prompt_ids"] == tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert line["ids"] == default_model.generate([line["prompt_ids"]], 7, temperature=0.7)[0]


def test_score_text_is_scored_with_bos(capsys, monkeypatch, default_model, tokenizer):
    monkeypatch.setattr(_common, "load_model", lambda args: default_model)
    code, out, _ = _run(capsys, "score", "--text", "The quick brown fox", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["ids"] == tokenizer.encode("The quick brown fox")  # BOS first
    assert np.abs(np.asarray(result["logprobs"]) - default_model.score(result["ids"])).max() == 0
    assert abs(result["nll"] + np.mean(result["logprobs"])) <= 1e-6


@pytest.mark.slow
def test_readme_command_streams_the_same_text_and_names_the_default_model(default_json):
    proc = subprocess.run([CLI, "generate", "--prompt", README_PROMPT, "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == default_json["text"] + "\n"
    assert "mixtral-jax: note: no --checkpoint given: running " in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flag", [None, "off"])
def test_compiled_programs_are_kept_in_the_user_cache_unless_off(tmp_path, flag):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([CLI, "generate", "--prompt", README_PROMPT, "--max-new-tokens", "2",
                           *(["--compile-cache", flag] if flag else [])], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / ".cache" / "mixtral-jax" / "xla"
    if flag == "off":
        assert not cache.exists()
    else:
        assert len(list(cache.iterdir())) >= 2  # the prefill and the decode programs at least


def _chat(capsys, monkeypatch, model, stdin: str, *argv: str, answer: list[int] | None = None):
    """Run `chat` on `stdin` with `model`; returns (exit code, stdout, [(prompt ids, new ids)] per turn, stderr).
    With `answer`, every turn streams those ids instead of running the model."""
    calls, original = [], Mixtral.stream

    def stream(self, prompt, *args, **kwargs):
        calls.append((list(prompt), []))
        for token in answer if answer is not None else original(self, prompt, *args, **kwargs):
            calls[-1][1].append(token)
            yield token

    monkeypatch.setattr(Mixtral, "stream", stream)
    monkeypatch.setattr(_common, "load_model", lambda args: model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = _run(capsys, "chat", *argv)
    return code, out, calls, err


def test_chat_keeps_the_history_with_the_system_prompts(capsys, monkeypatch, default_model, tokenizer):
    answer = tokenizer.encode("Four, I think.", bos=False) + [tokenizer.eos_id]
    text = tokenizer.decode(answer)
    code, out, calls, _ = _chat(capsys, monkeypatch, default_model, "Hello!\n\nWhat is 2+2?\n/exit\nnever read\n",
                             "--safe", "--system", "Be brief.", answer=answer)
    assert code == 0 and len(calls) == 2  # the empty line is skipped; nothing after /exit is read
    assert out == (text + "\n") * 2
    chat = [{"role": "system", "content": SAFE_PROMPT}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"}]
    assert calls[0][0] == tokenizer.encode_chat(chat)
    chat += [{"role": "assistant", "content": text.strip()}, {"role": "user", "content": "What is 2+2?"}]
    assert calls[1][0] == tokenizer.encode_chat(chat)


def test_chat_streams_the_model_answer_and_ends_at_end_of_input(capsys, monkeypatch, default_model, tokenizer):
    code, out, calls, _ = _chat(capsys, monkeypatch, default_model, "Hi", "--max-new-tokens", "7")
    assert code == 0 and len(calls) == 1
    assert calls[0][1] == default_model.generate([calls[0][0]], 7, temperature=0.7)[0]  # the CLI default
    assert out == tokenizer.decode(calls[0][1]) + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full(capsys, monkeypatch, default_model, tokenizer):
    small = default_model.with_options(max_seq_len=40)
    answer = tokenizer.encode("Fine.", bos=False) + [tokenizer.eos_id]
    lines = "".join(f"Message number {i}.\n" for i in range(4))
    code, _, calls, _ = _chat(capsys, monkeypatch, small, lines, "--max-new-tokens", "8", answer=answer)
    assert code == 0 and len(calls) == 4
    assert all(len(prompt) <= 40 - 8 for prompt, _ in calls)
    last = tokenizer.decode(calls[-1][0])
    assert "Message number 0." not in last and last.endswith("Message number 3. [/INST]")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["generate", "--prompt", "x", "--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    (["chat", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["generate", "--prompt", "x", "--checkpoint", "/no/such/checkpoint"], "no such file or folder"),
    (["score", "--text", "x", "--checkpoint", "/no/such/checkpoint"], "no such file or folder"),
    (["generate", "--prompt", "x", "--mesh", "bogus"], "bad mesh spec"),
    (["generate", "--prompt", "x", "--mesh", "data=3"], "has 3 devices but 1 are present"),
    (["generate", "--ids", "1,x"], "expected integers"),
    (["score", "--file", "/no/such/file.txt"], "cannot read"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code != 0
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_prompt_over_the_context_is_one_line_and_a_nonzero_exit(capsys, hf_mixtral):
    code, _, err = _run(capsys, "generate", "--checkpoint", str(hf_mixtral), "--ids", _ids([1] * 250),
                        "--max-new-tokens", "24")
    assert code == 1
    assert err == ("mixtral-jax generate: error: prompt 0 has 250 tokens; with max_new_tokens=24 that exceeds "
                   "the model's context of 256 tokens\n")


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([CLI, "generate", "--prompt", "x", "--top-p", "1.5"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "mixtral-jax generate: error: argument --top-p: must be in (0, 1], got 1.5\n"


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_generate_transformers_greedy_tokens_and_only_process_0_prints(hf_mixtral):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = [a for p in PROMPTS for a in ("--ids", _ids(p))]
    procs = [subprocess.Popen(
        [CLI, "generate", "--checkpoint", str(hf_mixtral), *args, "--temperature", "0", "--json", "--dtype",
         "float32", "--max-new-tokens", str(NEW), "--mesh", "data=2,expert=4", "--coordinator-address",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    lines = [json.loads(line) for line in outs[0][0].splitlines()]  # stdout holds the JSON lines and nothing else
    assert [line["ids"] for line in lines] == hf_greedy(hf_mixtral, tuple(map(tuple, PROMPTS)), NEW)
    assert outs[1][0] == ""


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["score", "--text", "x"]])
def test_an_empty_checkpoint_path_is_refused_not_the_default_model(capsys, command):
    code, out, err = _run(capsys, *command, "--checkpoint", "")
    assert code == 2 and out == ""
    assert err == f"mixtral-jax {command[0]}: error: argument --checkpoint: expected a path, got an empty string\n"


@pytest.mark.parametrize("argv", [["generate", "--prompt", "a\udcffb"], ["score", "--text", "a\udcffb"],
                                  ["chat", "--system", "a\udcffb"]])
def test_text_that_is_not_utf8_is_one_line(capsys, monkeypatch, default_model, argv):
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (here the byte 0xff)."""
    monkeypatch.setattr(_common, "load_model", lambda args: default_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == ""
    assert err == f"mixtral-jax {argv[0]}: error: the text is not valid UTF-8 (byte 0xff at character 1)\n"


def test_chat_refuses_a_line_that_is_not_utf8_and_keeps_talking(capsys, monkeypatch, default_model, tokenizer):
    answer = tokenizer.encode("Yes.", bos=False) + [tokenizer.eos_id]
    stdin = io.TextIOWrapper(io.BytesIO(b"first\nbad \xff line\nsecond\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    calls, answers = [], iter([answer, answer])
    monkeypatch.setattr(Mixtral, "stream", lambda self, prompt, *a, **k: calls.append(list(prompt)) or next(answers))
    monkeypatch.setattr(_common, "load_model", lambda args: default_model)
    code, out, err = _run(capsys, "chat")
    assert code == 0 and len(calls) == 2
    assert err == "mixtral-jax chat: error: the text is not valid UTF-8 (byte 0xff at character 4)\n"
    text = tokenizer.decode(answer).strip()
    assert calls[1] == tokenizer.encode_chat([{"role": "user", "content": "first"},
                                              {"role": "assistant", "content": text},
                                              {"role": "user", "content": "second"}])


def test_chat_refuses_a_message_too_long_for_the_context_and_keeps_the_history(capsys, monkeypatch, default_model,
                                                                              tokenizer):
    small = default_model.with_options(max_seq_len=48)
    answer = tokenizer.encode("Fine.", bos=False) + [tokenizer.eos_id]
    long_line = "word " * 60
    code, _, calls, err = _chat(capsys, monkeypatch, small, f"Hello.\n{long_line}\nAgain.\n", "--max-new-tokens",
                                "8", answer=answer)
    assert code == 0 and len(calls) == 2
    assert err.count("\n") == 1 and err.startswith("mixtral-jax chat: error: this message takes ")
    assert err.endswith("more than the 40 that the context leaves beside --max-new-tokens; it was not sent\n")
    text = tokenizer.decode(answer).strip()
    assert calls[1][0] == tokenizer.encode_chat([{"role": "user", "content": "Hello."},
                                                 {"role": "assistant", "content": text},
                                                 {"role": "user", "content": "Again."}])


def test_chat_option_errors_end_it_once_at_start(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\nthree\n"))
    code, out, err = _run(capsys, "chat", "--max-new-tokens", "-5")
    assert code == 2 and out == ""
    assert err == "mixtral-jax chat: error: argument --max-new-tokens: must be at least 1, got -5\n"


def test_a_model_vocabulary_larger_than_its_tokenizer_never_samples_unknown_ids(capsys, tmp_path, default_model,
                                                                               tokenizer):
    """Fine-tunes pad 32000 ids to 32064: the ids past the tokenizer are never sampled, even when the model
    likes them best."""
    import jax.numpy as jnp

    import mixtral_jax
    from mixtral_jax import checkpoint

    cfg = default_model.config.replace(vocab_size=tokenizer.vocab_size + 64)
    model = mixtral_jax.init_random(cfg, seed=0, dtype="float32")
    head = model.params["lm_head"]
    head.set_value(head.get_value().at[:, tokenizer.vocab_size:].set(1.0))  # the padded ids lead every logit
    checkpoint.write_model(tmp_path / "padded", model.config, model.checkpoint_params(),
                           tokenizer=_common_tokenizer_path())
    code, out, err = _run(capsys, "generate", "--checkpoint", str(tmp_path / "padded"), "--prompt", "def f",
                          "--prompt", "x", "--max-new-tokens", "6", "--json", "--temperature", "1.5", "--top-k", "100")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(0 <= t < tokenizer.vocab_size for line in lines for t in line["ids"])
    greedy = mixtral_jax.load(tmp_path / "padded").generate([[1, 5, 9]], 6, stop_at_eos=False)[0]
    assert len(greedy) == 6 and max(greedy) < tokenizer.vocab_size
    assert int(jnp.argmax(model.logits([[1, 5, 9]])[0, -1])) >= tokenizer.vocab_size  # unmasked, they would win


def _common_tokenizer_path() -> Path:
    from mixtral_jax import demo

    return demo.path() / "tokenizer.model"


def test_a_closed_pipe_ends_generate_quietly():
    proc = subprocess.Popen([CLI, "generate", "--prompt", README_PROMPT, "--max-new-tokens", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)
    proc.stdout.close()  # as `| head -c 5` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert err.startswith("mixtral-jax: note: no --checkpoint given") and err.count("\n") == 1


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5, 6.0])
def test_ctrl_c_ends_quietly_at_any_moment(delay):
    """Ctrl-C while JAX is imported, while the model loads, while compiling and while decoding: exit 130 and
    one line."""
    import signal
    import time

    # started with Ctrl-C's default action, as from a terminal, whatever this test process inherited or was set to
    proc = subprocess.Popen([CLI, "generate", "--prompt", README_PROMPT, "--max-new-tokens", "2000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] in ("mixtral-jax: interrupted", "mixtral-jax generate: interrupted")
    assert "Traceback" not in err and "Exception" not in err


def test_an_error_raised_from_a_ctrl_c_is_the_ctrl_c(monkeypatch, capsys):
    """A library that turns the KeyboardInterrupt into its own error (Python's dataclasses do, when the Ctrl-C
    lands in a module being imported) still ends the command as interrupted."""
    from mixtral_jax.cli import generate as generate_cli

    def run(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e

    monkeypatch.setattr(generate_cli, "run", run)
    assert main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "mixtral-jax generate: interrupted\n"
