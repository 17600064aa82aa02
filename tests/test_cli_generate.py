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
    return _common.load_model(argparse.Namespace(checkpoint=None, dtype=None, mesh=None))


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


def _chat(capsys, monkeypatch, model, stdin: str, *argv: str, answer: list[int] | None = None):
    """Run `chat` on `stdin` with `model`; returns (exit code, stdout, [(prompt ids, new ids)] per turn).
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
    code, out, _ = _run(capsys, "chat", *argv)
    return code, out, calls


def test_chat_keeps_the_history_with_the_system_prompts(capsys, monkeypatch, default_model, tokenizer):
    answer = tokenizer.encode("Four, I think.", bos=False) + [tokenizer.eos_id]
    text = tokenizer.decode(answer)
    code, out, calls = _chat(capsys, monkeypatch, default_model, "Hello!\n\nWhat is 2+2?\n/exit\nnever read\n",
                             "--safe", "--system", "Be brief.", answer=answer)
    assert code == 0 and len(calls) == 2  # the empty line is skipped; nothing after /exit is read
    assert out == (text + "\n") * 2
    chat = [{"role": "system", "content": SAFE_PROMPT}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"}]
    assert calls[0][0] == tokenizer.encode_chat(chat)
    chat += [{"role": "assistant", "content": text.strip()}, {"role": "user", "content": "What is 2+2?"}]
    assert calls[1][0] == tokenizer.encode_chat(chat)


def test_chat_streams_the_model_answer_and_ends_at_end_of_input(capsys, monkeypatch, default_model, tokenizer):
    code, out, calls = _chat(capsys, monkeypatch, default_model, "Hi", "--max-new-tokens", "7")
    assert code == 0 and len(calls) == 1
    assert calls[0][1] == default_model.generate([calls[0][0]], 7, temperature=0.7)[0]  # the CLI default
    assert out == tokenizer.decode(calls[0][1]) + "\n"


def test_chat_drops_the_oldest_turns_when_the_context_is_full(capsys, monkeypatch, default_model, tokenizer):
    small = default_model.with_options(max_seq_len=40)
    answer = tokenizer.encode("Fine.", bos=False) + [tokenizer.eos_id]
    lines = "".join(f"Message number {i}.\n" for i in range(4))
    code, _, calls = _chat(capsys, monkeypatch, small, lines, "--max-new-tokens", "8", answer=answer)
    assert code == 0 and len(calls) == 4
    assert all(len(prompt) <= 40 - 8 for prompt, _ in calls)
    last = tokenizer.decode(calls[-1][0])
    assert "Message number 0." not in last and last.endswith("Message number 3. [/INST]")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--top-k", "0"], "top_k must be an integer >= 1"),
    (["chat", "--top-p", "1.5"], "top_p must be in (0, 1]"),
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
    assert proc.returncode == 1
    assert proc.stderr == "mixtral-jax generate: error: top_p must be in (0, 1], got 1.5\n"


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
    lines = [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]
    assert [line["ids"] for line in lines] == hf_greedy(hf_mixtral, tuple(map(tuple, PROMPTS)), NEW)
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())
