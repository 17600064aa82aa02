"""The lm-eval model agrees with lm-eval's own Hugging Face model on the same weights (a random transformers
Mixtral converted by `mixtral-jax convert`): every log-likelihood within 1e-4 in float32, the same greedy flags
and accuracy, on a multiple-choice task and a rolling-log-likelihood task defined here (local data, no
download); and `eval lm-eval` refuses an unknown task in one line."""

import json
import os
import shutil

import numpy as np
import pytest

from mixtral_jax.cli import main
from tests import reference

os.environ["HF_DATASETS_OFFLINE"] = "1"

# Words of argparse.py only, single spaces: the SentencePiece model and its transformers conversion then
# split them alike (checked below), so both models see the same token ids.
QUESTIONS = [
    ("the parser adds an", ["argument", "action", "error", "group"], 0),
    ("the value of the default", ["is", "action", "parser", "return"], 0),
    ("if the option is", ["required", "self", "namespace", "help"], 0),
    ("return the", ["namespace", "argument", "value", "parser"], 2),
    ("the help message for the", ["group", "value", "action", "self"], 0),
    ("raise an", ["error", "argument", "action", "option"], 0),
]
TEXTS = ["the parser adds an argument to the group and returns the namespace of the values",
         "if the option is required the error message names the argument and the action " * 3]  # several windows

MULTIPLE_CHOICE = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ROLLING = """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, stdlib_tokenizer):
    """A random Mixtral with the 384-piece tokenizer, as a transformers folder and converted; the task folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    hf = reference.make_hf_checkpoint(root / "hf", vocab_size=384)
    shutil.copyfile(stdlib_tokenizer, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    assert main(["convert", str(hf), str(root / "converted")]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "choice.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "choice.yaml").write_text(MULTIPLE_CHOICE.format(data=tasks / "choice.jsonl"))
    (tasks / "rolling.yaml").write_text(ROLLING.format(data=tasks / "rolling.jsonl"))
    return hf, root / "converted", tasks


def _evaluate(lm, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=["tiny_choice", "tiny_rolling"], task_manager=TaskManager(
        include_path=str(tasks), include_defaults=False), log_samples=True, bootstrap_iters=0)


def _responses(result, task):
    return [np.array(s["resps"], dtype=object).reshape(-1, 2 if task == "tiny_choice" else 1)
            for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_model_agrees_with_lm_evals_hugging_face_model(setup):
    from lm_eval.models.huggingface import HFLM

    import mixtral_jax
    from mixtral_jax.evals.lm_eval_model import MixtralLM

    hf_folder, converted, tasks = setup
    # A 32-token context: the rolling texts take several windows, and the questions are cut from the left.
    hf_lm = HFLM(pretrained=str(hf_folder), dtype="float32", batch_size=4, device="cpu", max_length=32)
    ours = MixtralLM(model=mixtral_jax.load(converted, dtype="float32"), batch_size=4, max_length=32, progress=False)
    for text in [q for q, *_ in QUESTIONS] + TEXTS + [f"{q} {c}" for q, cs, _ in QUESTIONS for c in cs]:
        assert ours.tok_encode(text) == hf_lm.tok_encode(text), text
    theirs, mine = _evaluate(hf_lm, tasks), _evaluate(ours, tasks)
    for task in ("tiny_choice", "tiny_rolling"):
        a, b = _responses(theirs, task), _responses(mine, task)
        assert len(a) == len(b) == (len(QUESTIONS) if task == "tiny_choice" else len(TEXTS))
        for x, y in zip(a, b):
            np.testing.assert_allclose(x[:, 0].astype(float), y[:, 0].astype(float), rtol=0, atol=1e-4)
            if task == "tiny_choice":
                assert list(x[:, 1]) == list(y[:, 1])
    assert mine["results"]["tiny_choice"]["acc,none"] == theirs["results"]["tiny_choice"]["acc,none"]
    print("max |dll|", max(float(np.abs(x[:, 0].astype(float) - y[:, 0].astype(float)).max())
                            for t in ("tiny_choice", "tiny_rolling")
                            for x, y in zip(_responses(theirs, t), _responses(mine, t))),
          "acc", mine["results"]["tiny_choice"]["acc,none"], theirs["results"]["tiny_choice"]["acc,none"])


def test_generate_until_is_greedy_generate_cut_before_the_first_stop_sequence(setup):
    from lm_eval.api.instance import Instance

    import mixtral_jax
    from mixtral_jax.evals.lm_eval_model import MixtralLM

    _, converted, _ = setup
    model = mixtral_jax.load(converted, dtype="float32")
    lm = MixtralLM(model=model, batch_size=4, progress=False)
    contexts = [q for q, *_ in QUESTIONS[:3]]
    # The reference runs the same compiled programs: a batch of 3 takes 4 slots, decoded 4 steps a round.
    steps = zip(*model.stream([lm.tok_encode(c) for c in contexts], 12))
    full = [lm.tok_decode([t for t in row if t is not None]) for row in steps]
    stop = full[0].split()[1]  # a stop sequence the first answer holds
    requests = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": 12}), i)
                for i, c in enumerate(contexts)]
    assert lm.generate_until(requests) == [text.split(stop)[0] for text in full]
    assert lm.generate_until(requests)[0] != full[0]


def test_eval_lm_eval_refuses_an_unknown_task_in_one_line(setup, capsys):
    _, converted, tasks = setup
    code = main(["eval", "lm-eval", "--checkpoint", str(converted), "--tasks", "tiny_choice,no_such_task",
                 "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == ["mixtral-jax eval: error: unknown lm-eval task: no_such_task (`lm-eval ls tasks` "
                                 "lists them; --include-path adds a folder of task YAML files)"]
