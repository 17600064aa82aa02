"""The passkey and perplexity harnesses: prompts of the requested length with the key at the requested depth,
answers scored by their first number, perplexity numbers equal to a direct `score` of the same windows, resumed
reruns, the pictures written, and bad input refused in one line."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mixtral_jax import demo
from mixtral_jax.cli import main
from mixtral_jax.evals import passkey, perplexity
from mixtral_jax.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(demo.path() / "tokenizer.model")


@pytest.fixture(scope="module")
def model():
    return demo.load()


@pytest.mark.parametrize("length", [256, 1000, 4096, 32760])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_the_requested_length_and_the_key_at_the_requested_depth(tokenizer, length, depth):
    p = passkey.make_prompt(tokenizer, length, depth, 52817)
    assert abs(len(p.ids) - length) <= 0.01 * length
    needle = tokenizer.encode(passkey.NEEDLE.format(key=52817), bos=False)
    assert p.ids[p.needle_at: p.needle_at + len(needle)] == needle
    assert tokenizer.decode(p.ids).count("52817") == 2  # stated once (the key's sentence names it twice)
    head = len(tokenizer.encode(passkey.INSTRUCTION))
    tail = len(tokenizer.encode(passkey.QUESTION, bos=False))
    filler = len(p.ids) - head - len(needle) - tail
    unit = len(tokenizer.encode(passkey.FILLER, bos=False))
    # The key's sentence sits at the filler boundary nearest the depth: within half a filler sentence of it.
    assert abs((p.needle_at - head) - depth * filler) <= unit / 2 + 1


def test_passkey_lengths_past_the_context_are_refused_and_the_last_leaves_room_for_the_answer():
    assert passkey.prompt_length(1024, 2048) == 1024
    assert passkey.prompt_length(2048, 2048) == 2048 - passkey.ANSWER_TOKENS
    with pytest.raises(Exception, match="beyond the model's context of 2048"):
        passkey.prompt_length(4096, 2048)


@pytest.mark.parametrize("answer, found", [
    (" 52817. Remember it.", 52817), ("52817", 52817), (" is 5281 7", 5281), (" the key\n", None), ("", None),
    (" 12345 or 52817", 12345),
])
def test_passkey_answer_is_scored_by_its_first_number(answer, found):
    assert passkey.answer_key(answer) == found


def test_perplexity_equals_a_direct_score_of_the_same_windows(model, tokenizer):
    docs = [tokenizer.encode((STDLIB / name).read_text()) for name in ("textwrap.py", "fractions.py")]
    segs = perplexity.segments(docs, 128)
    assert all(len(s) == 128 for s in segs) and len(segs) >= 4
    segs = segs[:3]  # an odd count: the last batch is padded
    record = perplexity.run_context(model, segs, 64, 32, batch_size=2)  # windows: the segments' last halves
    direct = np.mean([-model.score(s[-64:])[-32:] for s in segs])
    assert record["windows"] == 3 and abs(record["nll"] - direct) <= 1e-5
    assert record["perplexity"] == pytest.approx(np.exp(direct), rel=1e-5)


def test_eval_passkey_on_the_demo_model_writes_json_and_png_and_resumes(tmp_path, capsys):
    # Lengths whose prompts and caches share buckets, so one set of compiled programs runs them all.
    argv = ["eval", "passkey", "--lengths", "150,170", "--depths", "2", "--trials", "2", "--batch-size", "4",
            "--output", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "passkey.json").read_text())
    assert (tmp_path / "passkey.png").read_bytes().startswith(PNG)
    trials = results["trials"]
    assert sorted({(t["length"], t["depth"]) for t in trials}) == [(150, 0.0), (150, 1.0), (170, 0.0), (170, 1.0)]
    assert len(trials) == 8 and all(t["correct"] == (passkey.answer_key(t["answer"]) == t["key"]) for t in trials)
    assert len(capsys.readouterr().out.splitlines()) == 4  # a line a cell
    trials[0]["answer"] = "kept"  # a rerun leaves what is written alone, and adds the new length only
    (tmp_path / "passkey.json").write_text(json.dumps(results))
    assert main([*argv[:3], "150,170,180", *argv[4:]]) == 0
    again = json.loads((tmp_path / "passkey.json").read_text())["trials"]
    assert again[:8] == trials and {t["length"] for t in again[8:]} == {180}
    assert main([*argv, "--force"]) == 0
    assert json.loads((tmp_path / "passkey.json").read_text())["trials"][0]["answer"] != "kept"
    assert main([*argv[:5], "3", *argv[6:]]) == 1  # other settings are not mixed into the same file
    assert "holds results of other settings (depths: 2 there, 3 now)" in capsys.readouterr().err


def test_eval_perplexity_writes_json_and_png(tmp_path, capsys):
    files = [str(STDLIB / "textwrap.py")]
    assert main(["eval", "perplexity", "--file", *files, "--contexts", "64,128", "--eval-tokens", "32",
                 "--batch-size", "2", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "perplexity.json").read_text())
    assert [r["context"] for r in results["contexts"]] == [64, 128]
    assert all(r["perplexity"] == pytest.approx(np.exp(r["nll"])) for r in results["contexts"])
    assert (tmp_path / "perplexity.png").read_bytes().startswith(PNG)
    assert "context    128" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["perplexity", "--file", "/no/such/file.txt"], "/no/such/file.txt: cannot read (No such file or directory)"),
    (["perplexity", "--file", str(STDLIB / "textwrap.py"), "--contexts", "512,4096"],
     "context 4096 is beyond the model's context of 2048 tokens"),
    (["passkey", "--lengths", "1024,4096"], "length 4096 is beyond the model's context of 2048 tokens"),
    (["passkey", "--lengths", "64,1024"], "length 64 is too short for a passkey prompt (it needs at least 131 tokens)"),
])
def test_eval_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, capsys, argv, message):
    assert main(["eval", *argv, "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mixtral-jax eval: error: {message}"


@pytest.mark.parametrize("package, argv", [
    ("matplotlib", ["passkey"]), ("lm-eval", ["lm-eval", "--tasks", "hellaswag"]),
])
def test_eval_without_the_extra_names_it(monkeypatch, tmp_path, capsys, package, argv):
    from mixtral_jax.evals import store

    real = store.importlib.util.find_spec
    monkeypatch.setattr(store.importlib.util, "find_spec",
                        lambda name, *a: None if name == store._MODULES[package] else real(name, *a))
    assert main(["eval", *argv, "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (f"mixtral-jax eval: error: {package} is not installed; it comes with "
                                               f"{store.EXTRA}")
